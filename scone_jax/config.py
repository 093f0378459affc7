"""The one config system: frozen dataclasses are the schema, ConfigDict is the CLI surface.

Experiment files under `experiments/` start from `base_config()` (a ConfigDict built from
these dataclasses' defaults, so the two can never drift), override what they need, and are
loaded with `config_flags.DEFINE_config_file(..., lock_config=True)` so a typo in
`--config.model.num_layers=4` fails before anything runs. `from_configdict` is the single
boundary where a ConfigDict becomes a validated, frozen `Config`; code below the entry
points only ever sees the dataclasses (layers never import ml_collections).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

import ml_collections
# The schema and the rules live in their own modules; this one is the API every caller
# imports (`config_lib.Config`, `config_lib.replace`, ...).
from scone_jax.config_checks import validate
from scone_jax.config_schema import (
    COMBINES, VALID_PREFIX, CheckpointConfig, Config, ConfigError, DataConfig,
    DistributedConfig, ExportConfig, FgramConfig, FgramModelConfig, MeshConfig, ModelConfig,
    ServeConfig, TokenizerConfig, TrainConfig, get_value, is_validation_corpus, stored_rule)

__all__ = [
    'COMBINES', 'VALID_PREFIX', 'CheckpointConfig', 'Config', 'ConfigError', 'DataConfig',
    'DistributedConfig', 'ExportConfig', 'FgramConfig', 'FgramModelConfig', 'MeshConfig',
    'ModelConfig', 'ServeConfig', 'TokenizerConfig', 'TrainConfig', 'base_config',
    'from_configdict', 'from_json', 'get_value', 'is_validation_corpus', 'replace',
    'stored_rule', 'validate']


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults, as an (unlocked) ConfigDict for experiment files."""
  return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def _build(cls, values: dict[str, Any], path: str):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
        f'unknown config key(s) {", ".join(f"{path}{k}" for k in unknown)}; '
        f'valid keys under "{path or "config."}": {", ".join(sorted(fields))}')
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    key = f'{path}{name}'
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, dict):
        raise ConfigError(f'config.{key} must be a section, got {value!r}')
      kwargs[name] = _build(hint, value, key + '.')
      continue
    if typing.get_origin(hint) is Literal:
      allowed = typing.get_args(hint)
      if value not in allowed:
        raise ConfigError(f'config.{key}={value!r} is not one of {list(allowed)}')
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif hint in (int, float, str, bool) and not isinstance(value, hint):
      raise ConfigError(f'config.{key}={value!r} must be of type {hint.__name__}')
    elif hint is int and isinstance(value, bool):
      raise ConfigError(f'config.{key}={value!r} must be an int, not a bool')
    kwargs[name] = value
  return cls(**kwargs)


def from_configdict(cd: ml_collections.ConfigDict | dict) -> Config:
  """The one boundary: ConfigDict (or plain dict) -> validated frozen Config."""
  values = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
  return validate(_build(Config, values, ''))


def from_json(text: str) -> Config:
  return from_configdict(json.loads(text))


def _get_dotted(values: dict[str, Any], dotted: str) -> Any:
  for part in dotted.split('.'):
    values = values[part]
  return values


def replace(cfg: Config, **overrides: Any) -> Config:
  """Dotted-key overrides on a Config, e.g. replace(cfg, **{'model.num_layers': 4})."""
  values = dataclasses.asdict(cfg)
  # `cfg` holds family defaults already resolved; re-derive them when what they derive
  # from changes (unless the override sets them too).
  derived = {'model.family': ('model.mlp_activation', 'model.norm', 'model.position',
                              'model.bias', 'model.qk_norm', 'model.norm_position'),
             'model.d_model': ('model.mlp_dim',),
             'fgram_model.kind': ('fgram_model.combine',)}
  defaults = dataclasses.asdict(Config())
  for key, names in derived.items():
    if key in overrides and overrides[key] != _get_dotted(values, key):
      for name in names:
        if name not in overrides:
          section, leaf = name.split('.')
          values[section][leaf] = defaults[section][leaf]
  for dotted, value in overrides.items():
    node = values
    *parents, leaf = dotted.split('.')
    for p in parents:
      if p not in node or not isinstance(node[p], dict):
        raise ConfigError(f'unknown config key {dotted}')
      node = node[p]
    if leaf not in node:
      raise ConfigError(f'unknown config key {dotted}')
    node[leaf] = value
  return from_configdict(values)
