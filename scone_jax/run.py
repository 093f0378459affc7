"""A finished (or running) training run directory, reopened anywhere: `RunDir`.

The trainer records in `W/run.json` everything a later reader needs, and `W/config.json`
holds the resolved config. Evaluate, export and generate open a run through this module
alone: they never import the train package, never rebuild the optimizer, and never look
at the raw corpus (prepare's job). A run directory copied to another machine or bucket,
or whose corpus was deleted, reopens as long as the artifacts it records are where it
says: paths inside W are stored relative to W, so W/prepare travels with W.

  W/config.json         resolved Config (train writes it before any work)
  W/run.json            vocab_size and fgram_max_len the model was built with; for the
                        tokenizer, f-gram table, train and eval token shards: location
                        and fingerprint; the checkpoint steps at the last save
  W/checkpoints/<step>/ orbax Composite: `state` (TrainState: params, opt_state, ...)
                        and `data` (iterator), and checksums.json (crc32c of every
                        file); `restore_model` checks those, then reads state.params and
                        state.other only, and refuses weights that are not finite
  W/eval.json, W/metrics.jsonl, W/tb/, W/export/

Layering: this module imports config, paths, artifacts, tokenizer, fgrams, model and
mesh; train/, evaluate, export/ and serve/ all build on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
from flax import nnx
import orbax.checkpoint as ocp

from scone_jax import artifacts, checkpoint_files, compat, metrics_file, paths
from scone_jax import config as config_lib
from scone_jax.config import Config
from scone_jax.errors import UserError
from scone_jax.fgrams import FgramTable
from scone_jax.model import SconeLM, model_shardings
from scone_jax.tokenizer import HFTokenizer, TokenShards, Tokenizer, open_tokenizer

CONFIG_FILE = 'config.json'
RUN_FILE = 'run.json'
CHECKPOINTS = 'checkpoints'
EVAL_FILE = 'eval.json'
RUN_FORMAT_VERSION = 1


class RunError(UserError, FileNotFoundError):
  """The directory is not a (finished) training run, or lacks what the caller needs."""


@dataclasses.dataclass(frozen=True)
class ArtifactRef:
  """Where an artifact is (relative to W when inside it) and its fingerprint."""
  location: str
  fingerprint: str


class RunDir:
  """A training run directory: local path or URL (gs://bucket/runs/x)."""

  def __init__(self, path: str):
    self.path = paths.resolve(path)

  def __repr__(self) -> str:
    return f'RunDir({self.path!r})'

  def join(self, *parts: str) -> str:
    return paths.join(self.path, *parts)

  @property
  def checkpoint_dir(self) -> str:
    return self.join(CHECKPOINTS)

  # ---- written by train -------------------------------------------------------------

  def _ref(self, location: str, fingerprint: str) -> dict[str, str]:
    location = paths.resolve(location)
    prefix = self.path.rstrip('/') + '/'
    if location.startswith(prefix):
      location = location[len(prefix):]
    return {'location': location, 'fingerprint': fingerprint}

  def record(self, *, vocab_size: int, fgram_max_len: int, tokenizer: Tokenizer,
             train_shards: TokenShards, eval_shards: dict[str, TokenShards],
             table: FgramTable | None, table_dir: str | None,
             checkpoint_steps: list[int] | None = None) -> dict[str, Any]:
    """Writes W/run.json (call on process 0 only). Returns the record."""
    record = {
        'format_version': RUN_FORMAT_VERSION,
        'vocab_size': int(vocab_size),
        'fgram_max_len': int(fgram_max_len),
        'tokenizer': self._ref(os.path.dirname(tokenizer.path), tokenizer.fingerprint),
        'train_shards': self._ref(train_shards.directory, train_shards.fingerprint),
        'eval_shards': {name: self._ref(s.directory, s.fingerprint)
                        for name, s in sorted(eval_shards.items())},
        'fgram_table': (None if table is None else self._ref(table_dir, table.fingerprint)),
        # Rows of the table before fgram.use_size (what sizes a kind='table' model).
        'fgram_table_rows': 0 if table is None else len(table),
        'checkpoint_steps': list(checkpoint_steps or []),
    }
    artifacts.write_json_atomic(self.join(RUN_FILE), record)
    return record

  def record_checkpoints(self, steps: list[int]) -> None:
    """Updates the checkpoint steps in W/run.json (process 0)."""
    record = self.info()
    record['checkpoint_steps'] = sorted(int(s) for s in steps)
    artifacts.write_json_atomic(self.join(RUN_FILE), record)

  # ---- read by evaluate / export / generate ----------------------------------------

  def config(self) -> Config:
    """W/config.json as the training run wrote it."""
    path = self.join(CONFIG_FILE)
    if not paths.exists(path):
      raise RunError(f'{path} does not exist: --workdir must be a training run '
                     '(python -m scone_jax.train ... --workdir=W writes it)')
    try:
      return config_lib.from_json(paths.read_text(path))
    except json.JSONDecodeError as e:
      raise RunError(f'{path} is corrupted ({e}); restore it from a copy of the run (train '
                     'writes it when a run starts)') from e

  def info(self) -> dict[str, Any]:
    """W/run.json: what the trainer recorded (vocab size, artifacts, checkpoints)."""
    path = self.join(RUN_FILE)
    if not paths.exists(path):
      raise RunError(f'{path} does not exist: {self.path} is not a training run, or one '
                     'started before run.json was recorded; run `python -m '
                     f'scone_jax.train --workdir={self.path}` (it resumes) to record it')
    try:
      return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
      raise RunError(f'{path} is corrupted ({e}); rerun train on this workdir to rewrite '
                     'it') from e

  @property
  def vocab_size(self) -> int:
    """The vocabulary size the model was trained with (may exceed the tokenizer's)."""
    return int(self.info()['vocab_size'])

  def metrics(self) -> list[dict[str, Any]]:
    """W/metrics.jsonl's complete records in order (scone_jax/metrics_file.py: the one
    reader; a partial last line is skipped)."""
    return metrics_file.read(self.path)

  def _location(self, ref: dict[str, str]) -> str:
    loc = ref['location']
    return loc if (paths.is_remote(loc) or os.path.isabs(loc)) else self.join(loc)

  def _check_fingerprint(self, what: str, ref: dict[str, str], have: str, want: str,
                         fix: str, same: bool) -> None:
    """Raises ArtifactError naming the artifact, both fingerprints and the fix unless `same`."""
    if not same:
      raise artifacts.ArtifactError(
          f'{what} at {self._location(ref)} has fingerprint {have}, but run {self.path} was '
          f'trained with {want}: {fix}')

  def tokenizer(self) -> Tokenizer | HFTokenizer:
    """The run's tokenizer, of whichever kind it was trained with (tokenizer.open_tokenizer
    reads the kind from the artifact's manifest), checked against W/run.json."""
    ref = self.info()['tokenizer']
    tok = open_tokenizer(self._location(ref))
    self._check_fingerprint('tokenizer', ref, tok.fingerprint[:16], ref['fingerprint'][:16],
                            'it was rebuilt or replaced; restore the run\'s tokenizer',
                            same=tok.fingerprint == ref['fingerprint'])
    return tok

  def table(self, fgram: config_lib.FgramConfig | None = None) -> FgramTable | None:
    """The f-gram table, or None for a baseline run; with `fgram`, its first
    `fgram.rows_used(rows)` rows (the S the run used)."""
    ref = self.info()['fgram_table']
    if ref is None:
      return None
    table = FgramTable.load(self._location(ref))
    self._check_fingerprint('f-gram table', ref, table.fingerprint, ref['fingerprint'],
                            'it was re-mined; restore the run\'s table',
                            same=table.fingerprint == ref['fingerprint'])
    if fgram is not None and fgram.rows_used(len(table)) < len(table):
      table = table.slice(fgram.rows_used(len(table)))
    return table

  def train_shards(self, verify: bool = True) -> TokenShards:
    """The token shards the run trained on, checked against the record."""
    ref = self.info()['train_shards']
    return TokenShards.open(self._location(ref), verify=verify,
                            expect={'fingerprint': ref['fingerprint']})

  def eval_shards(self, verify: bool = True) -> dict[str, TokenShards]:
    """The held-out token shards the run evaluates on, checked against the record."""
    out = {}
    for name, ref in self.info()['eval_shards'].items():
      out[name] = TokenShards.open(self._location(ref), verify=verify,
                                   expect={'fingerprint': ref['fingerprint']})
    return out

  def checkpoint_steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first (see checkpoint_files.committed_steps)."""
    return checkpoint_files.committed_steps(self.checkpoint_dir)

  def latest_step(self) -> int:
    steps = self.checkpoint_steps()
    if not steps:
      raise RunError(f'{self.checkpoint_dir} holds no checkpoint; train first '
                     f'(python -m scone_jax.train --workdir={self.path})')
    return steps[-1]

  def _check_checkpoint(self, step: int, steps: list[int]) -> None:
    """Refuses a step whose files fail their checksums (CheckpointCorruptError naming the
    newest intact older step); warns about one saved without checksums."""
    check = checkpoint_files.check_step(self.checkpoint_dir, step)
    if check.status == 'unverified':
      logging.warning('checkpoint step %d in %s is unverified (%s)', step,
                      self.checkpoint_dir, check.detail)
    else:
      self._refuse_if_corrupt(check, steps)

  def _refuse_if_corrupt(self, check: checkpoint_files.StepCheck, steps: list[int]) -> None:
    """CheckpointCorruptError if `check` says corrupt, naming the newest intact step."""
    if check.status == 'corrupt':
      older = [s for s in steps if s < check.step]
      intact = checkpoint_files.newest_intact(self.checkpoint_dir, older)
      checkpoint_files.raise_if_corrupt(self.checkpoint_dir, check, intact)

  def restore_model(self, cfg: Config, mesh: jax.sharding.Mesh,
                    step: int | None = None) -> tuple[SconeLM, int]:
    """The model's weights at `step` (default: the latest), sharded on `mesh`.

    Reads state.params and state.other of the checkpoint only (no optimizer state is
    built or read), into a SconeLM of the recorded vocab size and f-gram length, after
    checking the step's checksums; weights that are not finite are refused.

    Raises:
      RunError: no such step.
      CheckpointCorruptError: the step's files fail their checksums, or its weights are
        NaN/Inf (the message names the newest intact step and `python -m scone_jax.verify`).
    """
    info = self.info()
    steps = self.checkpoint_steps()
    step = self.latest_step() if step is None else int(step)
    if step not in steps:
      raise RunError(f'checkpoint step {step} is not in {self.checkpoint_dir} (committed '
                     f'steps: {steps}); pick one of those')
    self._check_checkpoint(step, steps)

    num_fgrams = (cfg.fgram.rows_used(info.get('fgram_table_rows', 0))
                  if cfg.fgram_model.kind == 'table' else 0)

    def make_model():
      return SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=info['fgram_max_len'],
                     vocab_size=info['vocab_size'], rngs=nnx.Rngs(cfg.train.seed),
                     num_fgrams=num_fgrams)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with compat.set_mesh(mesh):
      graphdef, params, other = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
      param_sh = model_shardings(params, mesh)
    target = {
        'params': jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
            param_sh),
        'other': jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), other),
    }
    # The step's `state` item alone, without a CheckpointManager (a read-only one logs
    # "Given directory is read only" on every open).
    state_dir = paths.join(checkpoint_files.step_dir(self.checkpoint_dir, step), 'state')
    try:
      state = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
    except (ValueError, KeyError) as e:
      raise artifacts.ArtifactError(
          f'checkpoint step {step} in {self.checkpoint_dir} does not fit the model of '
          f'{self.join(CONFIG_FILE)} / {self.join(RUN_FILE)} (vocab_size '
          f'{info["vocab_size"]}): {(str(e).splitlines() or [""])[0][:300]}') from e
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore reports undecodable bytes as a bare Exception with a page-long spec.
      self._refuse_if_corrupt(checkpoint_files.StepCheck(
          step, 'corrupt', f'it does not restore ({type(e).__name__}: '
          f'{(str(e).splitlines() or [""])[0][:200]})'), steps)
    if not checkpoint_files.all_finite(state['params']):
      self._refuse_if_corrupt(checkpoint_files.StepCheck(
          step, 'corrupt', 'its weights are not finite (NaN/Inf)'), steps)
    return nnx.merge(graphdef, state['params'], state['other']), step


def weights_fingerprint(lm) -> str:
  """sha256 over the model's parameters (name, dtype, shape, bytes), in name order.

  An exported store records the fingerprint of the weights it was computed from, and
  serving refuses a store whose fingerprint differs from the restored checkpoint's: the
  same table and step of another run (another seed, another lr) would otherwise serve
  rows A_f never produced for this backbone. Every process computes the same value
  (arrays sharded across hosts are gathered first).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(lm, nnx.Param))
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    value = leaf
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      value = multihost_utils.process_allgather(value, tiled=True)
    value = np.ascontiguousarray(np.asarray(value))
    h.update(f'{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|'.encode())
    h.update(value.view(np.uint8).reshape(-1).data)
  return h.hexdigest()
