"""The training loop: `train(cfg, workdir) -> TrainResult`.

One call prepares missing artifacts, snapshots the config, builds mesh / model / optimizer
/ data iterator, resumes from the newest checkpoint in W/checkpoints, and trains to
`train.steps`. Per step it dispatches step t and only then reads step t-1's scalars, so
the host never waits on the device except at checkpoint, eval and log steps. Metrics go
to W/metrics.jsonl and W/tb (process 0); a NaN/Inf loss or gradient norm stops the run
(`TrainingDivergedError`) without saving it, so the newest checkpoint stays the last good
one; SIGTERM saves at the next step boundary and returns with status 'preempted', which
`python -m scone_jax.train` exits with EXIT_PREEMPTED = 75 (EX_TEMPFAIL: "try again"), so
a scheduler (or the sweep runner) requeues it and the rerun resumes; a finished run exits 0.

A resume never rebuilds what the run trained on: prepare reopens the artifacts W/run.json
records and refuses changed inputs (prepare.RunInputsChangedError), and only the keys of
config_runtime.RESUMABLE_KEYS / CHANGEABLE_KEYS may differ from W/config.json. A NEW run
may start from another run's weights: `--config.train.init_from_run=OLD_W` restores
OLD_W's latest params into this run's model (every shape must match; optimizer state,
step and data order start fresh); a baseline OLD_W under a SCONE config gives the backbone
only (SCONE attached to a trained backbone: train/init_from.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from scone_jax import artifacts, batches, compat, paths, runlock
from scone_jax import config_runtime
from scone_jax.hf import load as hf_load
from scone_jax import evaluate as evaluate_lib
from scone_jax import run as run_lib
from scone_jax.config import Config, ConfigError
from scone_jax.train import checkpoint as checkpoint_lib
from scone_jax.train import init_from
from scone_jax import mesh as mesh_lib
from scone_jax.train import metrics as metrics_lib
from scone_jax.train import optimizer as optimizer_lib
from scone_jax.train import inputs as inputs_lib
from scone_jax.train import step as step_lib

# The train CLI's exit status when preempted (SIGTERM): os.EX_TEMPFAIL, "try again".
EXIT_PREEMPTED = os.EX_TEMPFAIL


class TrainingDivergedError(RuntimeError):
  """The loss or gradient norm became NaN/Inf."""


@dataclasses.dataclass
class TrainResult:
  workdir: str
  step: int  # Updates applied when train() returned.
  status: str  # 'completed' | 'preempted'
  resumed_from: int | None  # Checkpoint step the run started from (None = fresh).
  last_metrics: dict[str, float]  # The last step's train scalars.
  eval: dict[str, Any] | None  # The last eval record (as in W/eval.json).


def _read_run_config(workdir: str) -> dict[str, Any] | None:
  path = paths.join(workdir, run_lib.CONFIG_FILE)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


def check_run_config(cfg: Config, workdir: str,
                     allow_config_change: tuple[str, ...] = ()) -> None:
  """An existing run in `workdir` must have `cfg`'s config except for the keys that may
  change on resume (config_runtime.RESUMABLE_KEYS) and those in `allow_config_change`.

  Raises ConfigError naming every other differing key; reads only.
  """
  old = _read_run_config(workdir)
  if old is not None:
    changed = config_runtime.check_resume(old, cfg, workdir, tuple(allow_config_change))
    if changed:
      logging.warning('resuming %s with changed config keys: %s', workdir,
                      ', '.join(changed))


def write_run_config(cfg: Config, workdir: str,
                     allow_config_change: tuple[str, ...] = ()) -> None:
  """Writes W/config.json after `check_run_config` (raises, writing nothing, on a
  disallowed change)."""
  check_run_config(cfg, workdir, allow_config_change)
  if jax.process_index() == 0:
    artifacts.write_json_atomic(paths.join(workdir, run_lib.CONFIG_FILE),
                                json.loads(cfg.to_json()))


class _Preemption:
  """SIGTERM sets a flag the loop reads at the next step boundary (then saves and exits).

  Only installable from the main thread; elsewhere (a test calling train() in a thread)
  the process's existing handler stays.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step boundary, then exiting')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """The flag, OR-ed over processes so every process stops at the same step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))


def _vocab_size(cfg: Config, data: inputs_lib.TrainInputs) -> int:
  tok_vocab = data.tokenizer.vocab_size
  if cfg.model.vocab_size and cfg.model.vocab_size < tok_vocab:
    raise ConfigError(f'config.model.vocab_size={cfg.model.vocab_size} is smaller than the '
                      f'tokenizer vocabulary ({tok_vocab}); set it to 0 (= the tokenizer\'s)')
  return cfg.model.vocab_size or tok_vocab


def train(cfg: Config, workdir: str,
          allow_config_change: tuple[str, ...] = ()) -> TrainResult:
  """Trains (or resumes) the run in `workdir` to `cfg.train.steps` updates.

  Every check runs before anything is written: the config's values (config.validate, at
  the config boundary), the mesh against the devices and processes, and an existing run's
  config (only keys in config_runtime.RESUMABLE_KEYS or `allow_config_change` may differ). Then
  process 0 takes the run directory's lock (one writer per run) and removes temporary
  files a killed stage left.

  Raises:
    ConfigError: bad config, mesh or an incompatible existing run in `workdir`.
    RunLockedError: another live process trains in `workdir`.
    TrainingDivergedError: NaN/Inf loss or gradient norm (names the step).
    CheckpointSaveError: a checkpoint could not be saved (e.g. disk full).
  """
  cfg = hf_load.resolve_config(cfg)  # model.init_from: the checkpoint's architecture.
  config_runtime.check_data_source(cfg)  # Before the workdir is created.
  mesh_lib.maybe_initialize_distributed(cfg.distributed)
  config_runtime.validate_runtime(cfg, jax.device_count(), jax.process_count(),
                              jax.default_backend())
  workdir = run_lib.RunDir(workdir).path  # Local: absolute; gs://: as given.
  check_run_config(cfg, workdir, allow_config_change)
  if not run_lib.RunDir(workdir).checkpoint_steps():  # A new run reads A_f's source.
    init_from.check_source(cfg)  # Before anything is written.
  paths.makedirs(workdir)
  lock = _acquire_run_lock(workdir)
  try:
    if lock is not None:
      artifacts.clean_stale_temps(workdir)
    return _train_locked(cfg, workdir, allow_config_change)
  finally:
    if lock is not None:
      lock.release()


def _acquire_run_lock(workdir: str) -> runlock.RunLock | None:
  """Process 0 takes W's lock; every process raises RunLockedError if it could not (the
  others would otherwise wait at the next barrier for a process 0 that has stopped)."""
  lock, error = None, None
  if paths.is_remote(workdir):
    # The lock is an exclusively created local file; an object store has no such create
    # here, so one writer per bucket run directory is the launcher's job (sweeps run a
    # point once).
    logging.warning('run lock: %s is in an object store; no lock is taken', workdir)
    return None
  if jax.process_index() == 0:
    lock = runlock.RunLock(workdir)
    try:
      lock.acquire()
    except runlock.RunLockedError as e:
      lock, error = None, e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    locked = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not int(locked) and error is None:
      error = runlock.RunLockedError(f'process 0 could not take the lock of {workdir} '
                                     '(its log names the holder)')
  if error is not None:
    raise error
  return lock


def _train_locked(cfg: Config, workdir: str,
                  allow_config_change: tuple[str, ...]) -> TrainResult:
  run_dir = run_lib.RunDir(workdir)
  # Data first: on a resume it refuses changed inputs before config.json is rewritten.
  data = inputs_lib.open_train_inputs(cfg, workdir)
  write_run_config(cfg, workdir, allow_config_change)
  mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
  vocab_size = _vocab_size(cfg, data)
  if jax.process_index() == 0:
    # Before the first step: evaluate/export/generate reopen the run from this record.
    run_dir.record(vocab_size=vocab_size, fgram_max_len=cfg.fgram.max_len,
                   tokenizer=data.tokenizer, train_shards=data.train_shards,
                   eval_shards=data.eval_shards, table=data.table, table_dir=data.table_dir,
                   checkpoint_steps=run_dir.checkpoint_steps())
    if cfg.fgram_model.kind == 'hashed':
      _report_hash_collisions(cfg, workdir, data)
  graphdef, state, tx = step_lib.create_train_state(cfg, mesh, vocab_size, cfg.fgram.max_len,
                                                    data.table)
  data_it = batches.make_train_iterator(
      cfg, data.train_shards, data.table, jax.process_index(), jax.process_count(),
      bos_id=data.tokenizer.bos_id)
  ckpt = checkpoint_lib.Checkpointer(run_dir.checkpoint_dir, cfg.checkpoint,
                                    writer=True)
  resumed_from, state = ckpt.restore_latest(state, data_it)
  if resumed_from is None:
    state = init_from.init_params(cfg, workdir, state, mesh, data.tokenizer.fingerprint)
  if resumed_from is None and cfg.model.init_from:
    # Step 0 is the pretrained checkpoint (A_f and the f-gram side keep their init).
    state = dataclasses.replace(state, params=hf_load.load_params(cfg.model, state.params))
  step = int(resumed_from or 0)
  trainer = _Trainer(cfg, workdir, mesh, data_it, ckpt, metrics_lib.MetricsWriter(workdir),
                     evaluate_lib.Evaluator(cfg, graphdef, mesh, data),
                     metrics_lib.StepFlops(cfg, vocab_size, jax.process_count()))
  result = TrainResult(workdir, step, 'completed', resumed_from, {}, None)
  try:
    with _Preemption() as preemption:
      step_fn = step_lib.make_train_step(
          graphdef, tx, optimizer_lib.learning_rate_schedule(cfg.train),
          cfg.train.grad_accum_steps)
      _train_steps(trainer, step_fn, state, step, preemption, result)
  finally:
    ckpt.close()
    trainer.writer.close()
    if jax.process_index() == 0:
      run_dir.record_checkpoints(run_dir.checkpoint_steps())
  return result


HASH_COLLISIONS_FILE = 'hash_collisions.json'


def _report_hash_collisions(cfg: Config, workdir: str, data: inputs_lib.TrainInputs) -> None:
  """kind='hashed': logs and writes W/hash_collisions.json (per order: distinct n-grams of
  the training tokens, buckets used, share of occurrences in a shared bucket) once."""
  from scone_jax.model import hashed  # pylint: disable=g-import-not-at-top
  path = paths.join(workdir, HASH_COLLISIONS_FILE)
  if paths.exists(path):
    stats = json.loads(paths.read_text(path))
  else:
    fm = cfg.fgram_model
    stats = hashed.collision_stats(data.train_shards, fm.hash_max_n, fm.hash_buckets,
                                   data.tokenizer.bos_id)
    artifacts.write_json_atomic(path, stats)
  for line in hashed.format_collision_stats(stats):
    logging.info('%s', line)


@dataclasses.dataclass
class _Trainer:
  """The long-lived pieces of one train() call that the step loop uses."""
  cfg: Config
  workdir: str
  mesh: jax.sharding.Mesh
  data_it: Any
  ckpt: checkpoint_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  evaluator: evaluate_lib.Evaluator
  flops: metrics_lib.StepFlops

  def evaluate(self, step: int, state: step_lib.TrainState) -> dict[str, Any]:
    record = evaluate_lib.write_eval(self.workdir, step,
                                     self.evaluator(state.params, state.other))
    self.writer.write(step, {f'eval/{name}/{k}': v for name, r in record['corpora'].items()
                             for k, v in r.items()})
    return record


def _train_steps(trainer: _Trainer, step_fn, state: step_lib.TrainState, step: int,
                 preemption: _Preemption, result: TrainResult) -> None:
  """The step loop from `step` to train.steps; fills `result`."""
  cfg, mesh, data_it, ckpt, writer, flops = (
      trainer.cfg, trainer.mesh, trainer.data_it, trainer.ckpt, trainer.writer, trainer.flops)
  tc = cfg.train
  if step >= tc.steps:
    logging.info('run already at step %d >= train.steps=%d', step, tc.steps)
    result.eval = trainer.evaluate(step, state)
    return
  local_batch = next(data_it)
  inputs, stats = batches.split_stats(local_batch)
  global_batch = batches.to_global_arrays(inputs, mesh)
  train_step = step_lib.CompiledSteps(step_fn, mesh)  # One compile per A_f row bucket.
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, tc.peak_tflops)
  tokens_per_step = tc.batch_size * tc.seq_len
  every = cfg.checkpoint.every_steps

  pending = None  # (step, device metrics, host batch stats) not yet read.
  interval_start, interval_step = time.perf_counter(), step
  compile_mark = 0.0  # train_step.compile_seconds at interval_start: compiles are not steps.

  def finish(pending):
    s, metrics_dev, batch_stats = pending
    scalars = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
    if not (math.isfinite(scalars['loss']) and math.isfinite(scalars['grad_norm'])):
      ckpt.wait()
      raise TrainingDivergedError(
          f'step {s}: loss={scalars["loss"]}, grad_norm={scalars["grad_norm"]} (NaN/Inf); '
          f'stopped without saving. The last good checkpoint is step {ckpt.latest_step()} '
          f'in {ckpt.directory}; lower train.learning_rate or raise train.warmup_steps, '
          'then resume from it')
    scalars.update({f'batch/{k}': v for k, v in batch_stats.items()})
    return s, scalars

  with compat.set_mesh(mesh):
    while step < tc.steps:
      state, metrics_dev = train_step(state, global_batch)
      step += 1
      ckpt.raise_if_save_failed()  # A failed async save stops the run here.
      if pending is not None:
        finish(pending)
      pending = (step, metrics_dev, stats)
      last = step == tc.steps
      preempt = preemption.requested if jax.process_count() == 1 else (
          step % tc.log_every == 0 and preemption.agreed())
      save = last or preempt or (every > 0 and step % every == 0)
      log = last or save or step % tc.log_every == 0
      evaluate = last or (tc.eval_every > 0 and step % tc.eval_every == 0)
      if save or log or evaluate:
        s, scalars = finish(pending)
        pending = None
        result.last_metrics = scalars
        if save:
          ckpt.save(step, state, data_it)
        if log:
          now = time.perf_counter()
          compiling = train_step.compile_seconds - compile_mark
          seconds = (now - interval_start - compiling) / max(step - interval_step, 1)
          n = jax.device_count()
          scalars.update(step_seconds=seconds, tokens_per_second=tokens_per_step / seconds,
                         mfu=metrics_lib.mfu(flops.useful(stats), seconds, n, peak),
                         mfu_af_rows=metrics_lib.mfu(flops.af_rows(stats), seconds, n, peak),
                         mfu_worst_case=metrics_lib.mfu(flops.worst_case(), seconds, n, peak),
                         compiled_steps=train_step.num_compiled)
          writer.write(s, scalars)
          logging.info('step %d: loss %.4f grad_norm %.3f lr %.2e %.0f tok/s', s,
                       scalars['loss'], scalars['grad_norm'], scalars['lr'],
                       scalars['tokens_per_second'])
          interval_start, interval_step = now, step
          compile_mark = train_step.compile_seconds
        if evaluate:
          result.eval = trainer.evaluate(step, state)
          interval_start = time.perf_counter()  # Eval time is not step time.
        if preempt:
          result.status = 'preempted'
          break
      if not last:
        inputs, stats = batches.split_stats(next(data_it))
        global_batch = batches.to_global_arrays(inputs, mesh)
  writer.flush()
  result.step = step
