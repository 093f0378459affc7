"""Shared by the experiment files `experiments/gpt2.py` and `experiments/olmo.py`.

A preset argument is `<size>[,af=<multiplier>]` (e.g. `419m,af=2`). The A_f multiplier
sets A_f's depth to multiplier x the backbone's, so (at equal d_model) A_f's non-embedding
parameters are that multiple of the backbone's, as in the paper (0.5x, 1x, 2x, 3x).
af=0 (the default) is the plain backbone baseline.
"""

from __future__ import annotations

from typing import Mapping

import ml_collections

AF_MULTIPLIERS = (0.0, 0.5, 1.0, 2.0, 3.0)


def parse_arg(arg: str | None, sizes: Mapping[str, object], file: str) -> tuple[str, float]:
  """'419m,af=2' -> ('419m', 2.0); errors name the valid choices."""
  usage = (f'use --config={file}:<size>[,af=<mult>] with size in {sorted(sizes)} and mult '
           f'in {list(AF_MULTIPLIERS)}, e.g. --config={file}:{next(iter(sizes))},af=1')
  if not arg:
    raise ValueError(f'{file} needs a size argument: {usage}')
  name, *opts = [part.strip() for part in arg.split(',')]
  if name not in sizes:
    raise ValueError(f'unknown size {name!r} in {file}: {usage}')
  af = 0.0
  for opt in opts:
    key, _, value = opt.partition('=')
    if key != 'af' or not value:
      raise ValueError(f'unknown option {opt!r} in {file}: {usage}')
    try:
      af = float(value)
    except ValueError:
      raise ValueError(f'af={value!r} is not a number: {usage}') from None
    if af not in AF_MULTIPLIERS:
      raise ValueError(f'af={value} is not one of {list(AF_MULTIPLIERS)}: {usage}')
  return name, af


def apply_af(c: ml_collections.ConfigDict, af: float) -> None:
  """Sets fgram_model.num_layers = af x model.num_layers (0 = baseline)."""
  layers = af * c.model.num_layers
  if layers != int(layers):
    raise ValueError(f'af={af} x {c.model.num_layers} layers is not a whole number of layers')
  c.fgram_model.num_layers = int(layers)


def apply_paper_optimizer(c: ml_collections.ConfigDict) -> None:
  """The paper's AdamW settings shared by its GPT-2 and OLMo runs (docs/METHOD.md, section 3).

  Peak learning rate, warmup and steps differ per family and stay in the preset files.
  """
  c.train.lr_end_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1, c.train.b2 = 0.9, 0.95
  c.train.grad_clip = 1.0
