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
                        and `data` (iterator); `restore_model` reads state.params and
                        state.other only
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

import jax
import numpy as np
from flax import nnx
import orbax.checkpoint as ocp

from scone_jax import artifacts, compat, paths
from scone_jax import config as config_lib
from scone_jax.config import Config
from scone_jax.errors import UserError
from scone_jax.fgrams import FgramTable
from scone_jax.model import SconeLM, fgram_table, model_shardings
from scone_jax.tokenizer import TokenShards, Tokenizer

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

  def tokenizer(self) -> Tokenizer:
    ref = self.info()['tokenizer']
    tok = Tokenizer.load(self._location(ref))
    self._check_fingerprint('tokenizer', ref, tok.fingerprint[:16], ref['fingerprint'][:16],
                            'it was rebuilt or replaced; restore the run\'s tokenizer',
                            same=tok.fingerprint == ref['fingerprint'])
    return tok

  def table(self, use_size: int = 0) -> FgramTable | None:
    """The f-gram table (sliced to `use_size` when > 0), or None for a baseline run."""
    ref = self.info()['fgram_table']
    if ref is None:
      return None
    table = FgramTable.load(self._location(ref))
    self._check_fingerprint('f-gram table', ref, table.fingerprint, ref['fingerprint'],
                            'it was re-mined; restore the run\'s table',
                            same=table.fingerprint == ref['fingerprint'])
    if use_size and len(table) > use_size:
      table = table.slice(use_size)
    return table

  def eval_shards(self, verify: bool = True) -> dict[str, TokenShards]:
    """The held-out token shards the run evaluates on, checked against the record."""
    out = {}
    for name, ref in self.info()['eval_shards'].items():
      out[name] = TokenShards.open(self._location(ref), verify=verify,
                                   expect={'fingerprint': ref['fingerprint']})
    return out

  def checkpoint_steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first (orbax's listing is the truth)."""
    if not paths.exists(self.checkpoint_dir):
      return []
    manager = ocp.CheckpointManager(
        self.checkpoint_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      return sorted(int(s) for s in manager.all_steps())
    finally:
      manager.close()

  def latest_step(self) -> int:
    steps = self.checkpoint_steps()
    if not steps:
      raise RunError(f'{self.checkpoint_dir} holds no checkpoint; train first '
                     f'(python -m scone_jax.train --workdir={self.path})')
    return steps[-1]

  def restore_model(self, cfg: Config, mesh: jax.sharding.Mesh,
                    step: int | None = None) -> tuple[SconeLM, int]:
    """The model's weights at `step` (default: the latest), sharded on `mesh`.

    Reads state.params and state.other of the checkpoint only (no optimizer state is
    built or read), into a SconeLM of the recorded vocab size and f-gram length.
    """
    info = self.info()
    step = self.latest_step() if step is None else int(step)

    num_fgrams = (fgram_table.num_rows_used(info.get('fgram_table_rows', 0),
                                            cfg.fgram.use_size)
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
    manager = ocp.CheckpointManager(
        self.checkpoint_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
    except (ValueError, KeyError) as e:
      raise artifacts.ArtifactError(
          f'checkpoint step {step} in {self.checkpoint_dir} does not fit the model of '
          f'{self.join(CONFIG_FILE)} / {self.join(RUN_FILE)} (vocab_size '
          f'{info["vocab_size"]}): {e}') from e
    finally:
      manager.close()
    state = restored['state']
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
