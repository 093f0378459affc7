"""Training metrics: JSONL + TensorBoard (tensorboardX, no TensorFlow) on process 0, and MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the devices used. Model FLOPs come from the
written formula in `scone_jax.model.flops` (not from XLA's count, which includes
rematerialisation and padding); A_f's work is counted on the tokens of the step's DISTINCT
f-grams, not per matched position (see `StepFlops`). The peak is the dense bf16 tensor-core/MXU number per
device from the vendors' data sheets (`PEAK_FLOPS`, keyed by `jax.Device.device_kind`),
overridable with `config.train.peak_tflops` (required for anything not in the table; MFU
is omitted when the peak is unknown, e.g. on CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import jax

from scone_jax import metrics_file, paths
from scone_jax.config import Config
from scone_jax.model import flops as flops_lib

# The peak table and its lookup live with the FLOPs formulas (model/flops.py), which export
# uses too; named here for the train loop's and the benchmarks' callers.
PEAK_FLOPS = flops_lib.PEAK_FLOPS
peak_flops_per_device = flops_lib.peak_flops_per_device


class StepFlops:
  """Model FLOPs of one train step from `scone_jax.model.flops` (forward + backward).

  A_f's share, three ways, each from the step's batch stats (per process, so times the
  process count):
  * `useful(stats)`: A_f on the tokens of the batch's distinct f-grams (stat fgram_tokens),
    the model's work: the MFU we log.
  * `af_rows(stats)`: A_f on every packed row slot it ran (stat fgram_af_tokens, bucket
    padding and packing waste included): the hardware's work, logged as `mfu_af_rows`.
  * `worst_case()`: A_f at K tokens per main-model token (every position a distinct
    K-gram), the static bound, logged as `mfu_worst_case`.
  A_f runs once per optimizer step whatever train.grad_accum_steps is.
  """

  def __init__(self, cfg: Config, vocab_size: int, num_processes: int = 1):
    per_token = flops_lib.flops_per_token(cfg, vocab_size)
    self.tokens = cfg.train.batch_size * cfg.train.seq_len
    self.backbone = per_token.train_backbone * self.tokens
    self.per_af_token = per_token.train_fgram_per_af_token
    self.worst_af_tokens = per_token.af_tokens_per_token * self.tokens
    self.num_processes = num_processes

  def _with_af(self, af_tokens: float) -> float:
    return self.backbone + self.per_af_token * af_tokens

  def useful(self, batch_stats: Mapping[str, float]) -> float:
    return self._with_af(batch_stats.get('fgram_tokens', 0.0) * self.num_processes)

  def af_rows(self, batch_stats: Mapping[str, float]) -> float:
    return self._with_af(batch_stats.get('fgram_af_tokens', 0.0) * self.num_processes)

  def worst_case(self) -> float:
    return self._with_af(self.worst_af_tokens)


def mfu(model_flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  if peak_per_device is None or step_seconds <= 0:
    return None
  return model_flops_per_step / step_seconds / (peak_per_device * num_devices)


METRICS_FILE = metrics_file.METRICS_FILE


class MetricsWriter:
  """Appends one JSON object per logged step to W/metrics.jsonl and the same scalars to
  TensorBoard under W/tb. Only process 0 writes; on other processes every call is a no-op.

  The JSONL file is opened in append mode so a resumed run continues the same file; a run
  resumed from a checkpoint older than the last logged step logs those steps again (the
  later line for a step wins).

  A workdir in an object store (no append) is mirrored: both files are written to a
  local staging directory and uploaded whole (one PUT each, so never half-written) at
  most every `upload_seconds` and at flush/close; a killed run loses at most that much
  log, which the resumed run logs again from its checkpoint.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True,
               upload_seconds: float = 30.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    self._remote = None  # The object-store workdir the staging directory mirrors.
    if not self.enabled:
      return
    local = workdir
    if paths.is_remote(workdir):
      self._remote, self._upload_seconds, self._uploaded = workdir, upload_seconds, 0.0
      self._staging = local = tempfile.mkdtemp(prefix='scone_jax-metrics-')
      jsonl = paths.join(workdir, METRICS_FILE)
      if paths.exists(jsonl):  # A resumed run continues the file.
        with open(os.path.join(local, METRICS_FILE), 'wb') as f:
          f.write(paths.read_bytes(jsonl))
    os.makedirs(local, exist_ok=True)
    self._jsonl = open(os.path.join(local, METRICS_FILE), 'a')
    if tensorboard:
      import tensorboardX  # Imported lazily: only the writing process pays for it.
      self._tb = tensorboardX.SummaryWriter(os.path.join(local, 'tb'))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    self._jsonl.write(json.dumps({'step': int(step), **clean}, sort_keys=True) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)
    if self._remote and time.monotonic() - self._uploaded >= self._upload_seconds:
      self.flush()

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._remote and self._jsonl is not None:
      self._upload()

  def _upload(self) -> None:
    for name in sorted(paths.walk_files(self._staging)):
      with open(os.path.join(self._staging, name), 'rb') as f:
        paths.write_bytes(paths.join(self._remote, name), f.read())
    self._uploaded = time.monotonic()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._remote and self._jsonl is not None:
      self._upload()
      shutil.rmtree(self._staging, ignore_errors=True)
    self._jsonl = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The logged records merged per step (train and eval scalars of a step are separate
  lines; a resumed run may log a step again, the later value wins), sorted by step.
  Read through the one metrics.jsonl reader (scone_jax/metrics_file.py)."""
  by_step: dict[int, dict[str, Any]] = {}
  for record in metrics_file.read(workdir):
    if 'step' in record:
      by_step.setdefault(record['step'], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]
