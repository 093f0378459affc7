"""A trained run, reopened for export and serving: config, model at the latest step, data.

The model is restored exactly as `scone_jax.evaluate` does it (the same train-state
template through the training engineer's `create_train_state` and `Checkpointer`), so
export, evaluation and generation always read one checkpoint format.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from scone_jax import config as config_lib
from scone_jax import evaluate
from scone_jax.config import Config
from scone_jax.model import SconeLM
from scone_jax.train import checkpoint as checkpoint_lib
from scone_jax.train import mesh as mesh_lib
from scone_jax.train import rundata
from scone_jax.train import step as step_lib


@dataclasses.dataclass
class Run:
  """What export and generation need from a training run directory."""
  cfg: Config
  lm: SconeLM
  step: int
  tokenizer: Any  # scone_jax.tokenizer.Tokenizer
  table: Any | None  # FgramTable, sliced to fgram.use_size; None for a baseline
  mesh: jax.sharding.Mesh


def read_config(workdir: str) -> Config:
  """W/config.json as written by the training run (clear error if W is not a run)."""
  return evaluate.read_config(workdir)


def load_run(cfg: Config, workdir: str, with_table: bool = True) -> Run:
  """Restores W's latest checkpoint into a SconeLM and opens the tokenizer and table.

  Raises:
    FileNotFoundError: W has no checkpoint yet.
    ArtifactError: the prepared artifacts are missing or stale.
  """
  mesh_lib.maybe_initialize_distributed(cfg.distributed)
  data = rundata.open_run_data(cfg, workdir, build_missing=False)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  ckpt = checkpoint_lib.Checkpointer(rundata.checkpoint_dir(workdir), cfg.checkpoint)
  step = ckpt.latest_step()
  if step is None:
    ckpt.close()
    raise FileNotFoundError(
        f'{os.path.join(workdir, "checkpoints")} holds no checkpoint; train first '
        f'(python -m scone_jax.train --workdir={workdir})')
  graphdef, state, _ = step_lib.create_train_state(cfg, mesh, data.vocab_size,
                                                   cfg.fgram.max_len)
  state = ckpt.restore(step, state)
  ckpt.close()
  lm = nnx.merge(graphdef, state.params, state.other)
  table = data.table if (with_table and cfg.is_scone) else None
  if table is not None and cfg.fgram.use_size and len(table) > cfg.fgram.use_size:
    table = table.slice(cfg.fgram.use_size)
  return Run(cfg=cfg, lm=lm, step=int(step), tokenizer=data.tokenizer, table=table,
             mesh=mesh)


# Sections a serving command may change; everything else is fixed by the trained run.
SERVING_SECTIONS = ('export', 'serve')


def run_config(workdir: str, overrides: dict[str, Any]) -> Config:
  """W/config.json with command-line `--config.export.*` / `--config.serve.*` overrides.

  Raises:
    ValueError: an override outside the serving sections (the model and data of a
      trained run cannot change after training).
  """
  bad = sorted(k for k in overrides if k.split('.')[0] not in SERVING_SECTIONS)
  if bad:
    raise ValueError(f'--config.{bad[0]} cannot be changed here: W/config.json fixes the '
                     f'trained run; only --config.{{{",".join(SERVING_SECTIONS)}}}.* apply')
  return config_lib.replace(read_config(workdir), **overrides)
