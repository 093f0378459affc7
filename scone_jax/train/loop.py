"""The training loop: `train(cfg, workdir) -> TrainResult`.

One call prepares missing artifacts, snapshots the config, builds mesh / model / optimizer
/ data iterator, resumes from the newest checkpoint in W/checkpoints, and trains to
`train.steps`. Per step it dispatches step t and only then reads step t-1's scalars, so
the host never waits on the device except at checkpoint, eval and log steps. Metrics go
to W/metrics.jsonl and W/tb (process 0); a NaN/Inf loss or gradient norm stops the run
(`TrainingDivergedError`) without saving it, so the newest checkpoint stays the last good
one; SIGTERM saves at the next step boundary and returns with status 'preempted'.
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

from scone_jax import artifacts, batches, compat
from scone_jax import config as config_lib
from scone_jax import evaluate as evaluate_lib
from scone_jax.config import Config, ConfigError
from scone_jax.train import checkpoint as checkpoint_lib
from scone_jax.train import mesh as mesh_lib
from scone_jax.train import metrics as metrics_lib
from scone_jax.train import optimizer as optimizer_lib
from scone_jax.train import rundata
from scone_jax.train import step as step_lib

# Config keys (dotted prefixes) that may differ between a run's config.json and a resumed
# invocation: they change how long / how often things happen or where the run executes,
# never the model, the data or the optimisation up to the steps already taken.
# (train.steps moves the cosine schedule's end: resuming with more steps continues on the
# longer schedule from the restored step.)
RESUMABLE_KEYS = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
                  'train.data_prefetch', 'train.peak_tflops', 'checkpoint.', 'distributed.',
                  'mesh.')


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


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def write_run_config(cfg: Config, workdir: str) -> None:
  """Writes W/config.json; an existing one must match except for RESUMABLE_KEYS.

  Raises ConfigError naming every differing key (and writes nothing) otherwise.
  """
  path = os.path.join(workdir, 'config.json')
  new = json.loads(cfg.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    try:
      # Resolve through the schema so keys added since the run started compare as their
      # defaults (a newer checkout can resume an older run).
      old = json.loads(config_lib.from_configdict(old).to_json())
    except ConfigError:
      pass  # A key the schema no longer has: compare raw, which reports it.
    old_flat, new_flat = _flatten(old), _flatten(new)
    diffs = sorted(k for k in set(old_flat) | set(new_flat)
                   if old_flat.get(k, '<missing>') != new_flat.get(k, '<missing>')
                   and not k.startswith(RESUMABLE_KEYS))
    if diffs:
      detail = ', '.join(f'{k}: {old_flat.get(k, "<missing>")!r} in the run, '
                         f'{new_flat.get(k, "<missing>")!r} now' for k in diffs)
      raise ConfigError(
          f'{workdir} holds a run with an incompatible config ({detail}). Use a new '
          '--workdir, or pass the same values to resume this run (only '
          f'{", ".join(RESUMABLE_KEYS)} may change on resume)')
  if jax.process_index() == 0:
    artifacts.write_json_atomic(path, new)


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


def _vocab_size(cfg: Config, data: rundata.RunData) -> int:
  tok_vocab = data.tokenizer.vocab_size
  if cfg.model.vocab_size and cfg.model.vocab_size < tok_vocab:
    raise ConfigError(f'config.model.vocab_size={cfg.model.vocab_size} is smaller than the '
                      f'tokenizer vocabulary ({tok_vocab}); set it to 0 (= the tokenizer\'s)')
  return cfg.model.vocab_size or tok_vocab


def train(cfg: Config, workdir: str) -> TrainResult:
  """Trains (or resumes) the run in `workdir` to `cfg.train.steps` updates.

  Raises:
    ConfigError: bad config, mesh or an incompatible existing run in `workdir`.
    TrainingDivergedError: NaN/Inf loss or gradient norm (names the step).
  """
  mesh_lib.maybe_initialize_distributed(cfg.distributed)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  # Cheap checks first, so a bad mesh fails before anything is prepared or written.
  mesh_lib.check_mesh(cfg.mesh, jax.device_count(), cfg.train.batch_size)
  write_run_config(cfg, workdir)
  data = rundata.open_run_data(cfg, workdir)
  mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
  vocab_size = _vocab_size(cfg, data)
  graphdef, state, tx = step_lib.create_train_state(cfg, mesh, vocab_size, cfg.fgram.max_len)
  data_it = batches.make_train_iterator(
      cfg, data.train_shards, data.table, jax.process_index(), jax.process_count(),
      bos_id=data.tokenizer.bos_id)
  ckpt = checkpoint_lib.Checkpointer(rundata.checkpoint_dir(workdir), cfg.checkpoint)
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state = ckpt.restore(resumed_from, state, data_it)
  step = int(resumed_from or 0)
  run = _Run(cfg, workdir, mesh, data_it, ckpt, metrics_lib.MetricsWriter(workdir),
             evaluate_lib.Evaluator(cfg, graphdef, mesh, data),
             metrics_lib.StepFlops(cfg, vocab_size, jax.process_count()))
  result = TrainResult(workdir, step, 'completed', resumed_from, {}, None)
  try:
    with _Preemption() as preemption:
      step_fn = step_lib.make_train_step(
          graphdef, tx, optimizer_lib.learning_rate_schedule(cfg.train),
          cfg.train.grad_accum_steps)
      _train_steps(run, step_fn, state, step, preemption, result)
  finally:
    ckpt.close()
    run.writer.close()
  return result


@dataclasses.dataclass
class _Run:
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


def _train_steps(run: _Run, step_fn, state: step_lib.TrainState, step: int,
                 preemption: _Preemption, result: TrainResult) -> None:
  """The step loop from `step` to train.steps; fills `result`."""
  cfg, mesh, data_it, ckpt, writer, flops = (run.cfg, run.mesh, run.data_it, run.ckpt,
                                             run.writer, run.flops)
  tc = cfg.train
  if step >= tc.steps:
    logging.info('run already at step %d >= train.steps=%d', step, tc.steps)
    result.eval = run.evaluate(step, state)
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
          result.eval = run.evaluate(step, state)
          interval_start = time.perf_counter()  # Eval time is not step time.
        if preempt:
          result.status = 'preempted'
          break
      if not last:
        inputs, stats = batches.split_stats(next(data_it))
        global_batch = batches.to_global_arrays(inputs, mesh)
  writer.flush()
  result.step = step
