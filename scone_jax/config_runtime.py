"""The config rules that need more than the config: the runtime (devices, processes,
backend, optional packages), where a run starts (its data source), and a resumed run's
recorded config (which keys may change on resume).

`config.validate` (through `from_configdict`) checks everything a config can check alone;
entry points call these once the runtime is up, before anything is prepared or written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from scone_jax.config import Config, ConfigError, MeshConfig, from_configdict


def check_data_source(cfg: Config) -> None:
  """Refuses the embedded corpus for configs that set data.allow_embedded=False.

  Called where a run starts (prepare, train) rather than in `validate`, so sweep dry runs
  and accounting still load the paper presets.
  """
  if cfg.data.source == 'embedded' and not cfg.data.allow_embedded:
    raise ConfigError(
        f'config {cfg.name!r} is a paper-scale preset and refuses to train on the embedded '
        'stdlib corpus. Point it at your data: --config.data.source=files '
        "--config.data.train_files='/data/owt/train-*.parquet' --config.data.format=parquet "
        "--config.data.eval_files='heldout=/data/owt/val-*.parquet' "
        '--config.tokenizer.kind=huggingface --config.tokenizer.model_file=/data/gpt2/'
        'tokenizer.json (formats: lines, blank_lines, jsonl, parquet, arrayrecord, '
        'arrayrecord_tokens). To train on the embedded corpus anyway, pass '
        '--config.data.allow_embedded=True')
def resolve_mesh(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) shape: resolves `data=-1`; the axes must multiply to the
  device count."""
  data, fsdp, tensor = mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor
  if fsdp < 1 or tensor < 1:
    raise ConfigError(f'config.mesh.fsdp={fsdp} and config.mesh.tensor={tensor} must be >= 1')
  if data == -1:
    if num_devices % (fsdp * tensor):
      raise ConfigError(
          f'config.mesh.fsdp*tensor={fsdp}*{tensor} does not divide the {num_devices} '
          'devices; pick fsdp and tensor whose product divides the device count')
    data = num_devices // (fsdp * tensor)
  elif data < 1:
    raise ConfigError(f'config.mesh.data={data} must be >= 1 or -1 (= the remaining devices)')
  if data * fsdp * tensor != num_devices:
    raise ConfigError(
        f'config.mesh data*fsdp*tensor={data}*{fsdp}*{tensor}={data * fsdp * tensor} does '
        f'not equal the {num_devices} devices; set --config.mesh.data=-1 to use the rest, '
        'or change the axis sizes so their product is the device count')
  return data, fsdp, tensor


def check_batch_on_mesh(global_batch: int, shape: tuple[int, int, int]) -> None:
  """Each batch shard (data x fsdp) must get whole sequences."""
  data, fsdp, _ = shape
  if global_batch % (data * fsdp):
    raise ConfigError(
        f'config.train.batch_size={global_batch} is not divisible by mesh data*fsdp='
        f'{data}*{fsdp}={data * fsdp}; make the batch a multiple of {data * fsdp} or '
        'move devices to config.mesh.tensor')


def validate_runtime(cfg: Config, num_devices: int, num_processes: int,
                     platform: str = '') -> None:
  """The rules that need the runtime: mesh vs devices, batch vs mesh and processes, the
  backend (`platform`, jax.default_backend(); '' skips) and optional packages.

  Cheap and side-effect free: entry points call it right after the distributed runtime
  is up (jax.device_count() is known) and before anything is prepared or written.
  """
  if cfg.model.attention == 'cudnn' and platform and platform != 'gpu':
    raise ConfigError(f"config.model.attention='cudnn' needs an NVIDIA GPU, but the backend "
                      f"is {platform!r}; use config.model.attention='einsum'")
  if cfg.fgram.miner == 'beam' and importlib.util.find_spec('apache_beam') is None:
    raise ConfigError("config.fgram.miner='beam' needs apache-beam: pip install -r "
                      "requirements-beam.txt, or use config.fgram.miner='local'")
  shape = resolve_mesh(cfg.mesh, num_devices)
  check_batch_on_mesh(cfg.train.batch_size, shape)
  if cfg.train.batch_size % num_processes:
    raise ConfigError(
        f'config.train.batch_size={cfg.train.batch_size} is not divisible by the '
        f'{num_processes} processes; each process reads an equal slice of every batch')
  dist = cfg.distributed
  if dist.mode == 'explicit' and dist.num_processes != num_processes:
    raise ConfigError(f'config.distributed.num_processes={dist.num_processes} but the runtime '
                      f'has {num_processes} processes')


# Keys (dotted prefixes) that may differ between a run's config.json and a resumed
# invocation without an explicit override: they change how often things are logged,
# evaluated or saved, where the run executes or its artifacts live (prepared stages are
# keyed by their inputs' fingerprints), how a table is mined (never re-mined on resume),
# checks that only refuse inputs, or stages after training; never the model, the data,
# the optimisation or the schedule.
RESUMABLE_KEYS = ('name', 'train.log_every', 'train.eval_every', 'train.eval_batches',
                  'train.data_prefetch', 'train.peak_tflops', 'train.init_from_run',
                  'train.device_memory_bytes',
                  'checkpoint.', 'distributed.', 'mesh.', 'data.artifacts_dir', 'export.',
                  'serve.', 'data.allow_embedded', 'data.allow_no_eval', 'data.check_format',
                  'fgram.allow_short_table', 'fgram.miner', 'fgram.memory_budget_mb',
                  # How the step is computed, not what (equal up to rounding; tested in
                  # test_model/test_accel): a resumed run may switch kernels or memory plan.
                  'model.attention', 'model.remat', 'model.loss_chunk')
# Keys that may change on resume only when named in `allow` (the train CLI's
# --allow_config_change): the length of the run and the optimiser's schedule and
# hyperparameters. They change the run's math but no shape, no data and no artifact, so
# the checkpoint restores into the new config. Every other key (model, fgram, fgram_model,
# tokenizer, data, batch, seq_len, seed, ...) can never change in a run: start a new
# --workdir, optionally from this run's weights (train.init_from_run).
CHANGEABLE_KEYS = ('train.steps', 'train.learning_rate', 'train.warmup_steps',
                   'train.lr_end_ratio', 'train.weight_decay', 'train.b1', 'train.b2',
                   'train.eps', 'train.grad_clip', 'train.fgram_model_lr_scale')


def _key_matches(key: str, pattern: str) -> bool:
  """'train.steps' matches 'train.steps', 'train.' and 'train'."""
  pattern = pattern.rstrip('.')
  return key == pattern or key.startswith(pattern + '.')


def flat_dict(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_dict(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_resume(run_values: dict[str, Any], cfg: Config, run_dir: str,
                 allow: tuple[str, ...] = ()) -> list[str]:
  """Checks a resumed invocation's `cfg` against the run's recorded config (a dict from
  its config.json). Returns the changed keys that were allowed; raises ConfigError naming
  every other changed key.

  Args:
    run_values: the run's config.json, parsed.
    cfg: the config of this invocation.
    run_dir: for the message.
    allow: dotted keys or prefixes (e.g. 'train.steps', 'train.') the user explicitly
      allows to change.
  """
  known = flat_dict(dataclasses.asdict(cfg))
  for key in allow:
    if not any(_key_matches(k, key) for k in known):
      raise ConfigError(f'--allow_config_change={key}: no such config key or section '
                        '(e.g. train.steps)')
    if not any(_key_matches(p, key) or _key_matches(key, p) for p in CHANGEABLE_KEYS):
      raise ConfigError(
          f'--allow_config_change={key}: {key} can never change in a run (it changes the '
          'model\'s shapes, its data or its artifacts); only '
          f'{", ".join(CHANGEABLE_KEYS)} may. Train a new run in a new --workdir, '
          f'optionally from this run\'s weights: --config.train.init_from_run={run_dir}')
  try:
    # Resolve through the schema so keys added since the run started compare as their
    # defaults (a newer checkout can resume an older run).
    run_values = dataclasses.asdict(from_configdict(run_values))
  except ConfigError:
    pass  # A key the schema no longer has: compare raw, which reports it.
  old, new = flat_dict(run_values), known
  changed = sorted(k for k in set(old) | set(new)
                   if old.get(k, '<missing>') != new.get(k, '<missing>'))
  # A section in `allow` ('train.') admits only its changeable keys.
  allowed = [k for k in changed if any(_key_matches(k, p) for p in RESUMABLE_KEYS) or (
      any(_key_matches(k, p) for p in allow) and any(_key_matches(k, p)
                                                      for p in CHANGEABLE_KEYS))]
  refused = [k for k in changed if k not in allowed]
  if refused:
    detail = ', '.join(f'{k}: {old.get(k, "<missing>")!r} in the run, '
                       f'{new.get(k, "<missing>")!r} now' for k in refused)
    changeable = [k for k in refused if any(_key_matches(k, p) for p in CHANGEABLE_KEYS)]
    fixed = [k for k in refused if k not in changeable]
    fixes = ['pass the run\'s values to resume it',
             'use a new --workdir (optionally starting from this run\'s weights: '
             f'--config.train.init_from_run={run_dir})' + (
                 f', the only way to change {", ".join(fixed)}: they can never change in a '
                 'run (shapes, data or artifacts)' if fixed else '')]
    if changeable:
      fixes.append(f'pass --allow_config_change={",".join(changeable)} to resume with '
                   f'{"that change" if len(changeable) == 1 else "those changes"}')
    raise ConfigError(f'{run_dir} holds a run with an incompatible config ({detail}); '
                      + '; or '.join(fixes))
  return allowed
