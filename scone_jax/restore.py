"""A trained run, reopened for export and serving: config, model at the latest step, data.

Everything comes from `scone_jax.run.RunDir`: the recorded vocab size, tokenizer and
f-gram table (checked against their fingerprints) and the model's weights alone, so
export and generation never import the train package or build optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax import run as run_lib
from scone_jax.config import Config
from scone_jax.model import SconeLM


@dataclasses.dataclass
class LoadedRun:
  """What export and generation need from a training run directory."""
  cfg: Config
  lm: SconeLM
  step: int
  tokenizer: Any  # scone_jax.tokenizer.Tokenizer
  table: Any | None  # FgramTable, its first cfg.fgram.rows_used rows; None: baseline
  mesh: jax.sharding.Mesh
  vocab_size: int  # What the model was trained with (>= the tokenizer's).

  @functools.cached_property
  def weights_fingerprint(self) -> str:
    """sha256 of the restored parameters (what an exported store records and serving
    checks); computed on first use, it reads every parameter once."""
    return run_lib.weights_fingerprint(self.lm)


def read_config(workdir: str) -> Config:
  """W/config.json as written by the training run (clear error if W is not a run)."""
  return run_lib.RunDir(workdir).config()


def load_run(cfg: Config, workdir: str, with_table: bool = True) -> LoadedRun:
  """Restores W's latest weights into a SconeLM and opens the tokenizer and table.

  Raises:
    RunError: W is not a run or has no checkpoint yet.
    ArtifactError: a recorded artifact is missing or not the one the run trained with.
  """
  mesh_lib.maybe_initialize_distributed(cfg.distributed)
  run_dir = run_lib.RunDir(workdir)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  lm, step = run_dir.restore_model(cfg, mesh)
  table = (run_dir.table(cfg.fgram)
           if (with_table and cfg.fgram_model.uses_fgram_table) else None)
  return LoadedRun(cfg=cfg, lm=lm, step=int(step), tokenizer=run_dir.tokenizer(),
                   table=table, mesh=mesh, vocab_size=run_dir.vocab_size)


# Sections a serving command may change; everything else is fixed by the trained run.
SERVING_SECTIONS = ('export', 'serve')
# Where a stage after training runs (its processes and mesh), which the trained weights do
# not depend on: export, evaluate and generate accept these too.
PLACEMENT_SECTIONS = ('distributed', 'mesh')


def run_config(workdir: str, overrides: dict[str, Any]) -> Config:
  """W/config.json with command-line overrides of the serving and placement sections
  (`--config.export.*`, `--config.serve.*`, `--config.distributed.*`, `--config.mesh.*`).

  Raises:
    ValueError: an override outside those sections (the model and data of a trained run
      cannot change after training).
  """
  allowed = SERVING_SECTIONS + PLACEMENT_SECTIONS
  bad = sorted(k for k in overrides if k.split('.')[0] not in allowed)
  if bad:
    raise ValueError(f'--config.{bad[0]} cannot be changed here: W/config.json fixes the '
                     f'trained run; only --config.{{{",".join(allowed)}}}.* apply')
  cfg = read_config(workdir)
  if cfg.distributed.mode == 'explicit':
    # A coordinator address and process ids name the TRAINING job's processes, gone now:
    # reopening with them would wait for processes that never come. This invocation's
    # placement is its own (--config.distributed.*; default one process). 'auto' is kept:
    # it re-detects the current environment (SLURM, TPU pod).
    cfg = dataclasses.replace(cfg, distributed=config_lib.DistributedConfig())
  return config_lib.replace(cfg, **overrides)
