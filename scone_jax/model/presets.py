"""Shared by the experiment files `experiments/gpt2.py` and `experiments/olmo.py`.

A preset argument is `<size>[,af=<multiplier>|,af_layers=<n>]`:
  `419m,af_layers=6`  A_f with 6 layers (the paper's 170M A_f for the 419M model).
  `419m,af=2`         A_f at 2x the backbone's depth, i.e. 24 layers here.
A_f has the backbone's width, so its size is set by its own LAYER COUNT
(fgram_model.num_layers); the multiplier is a convenience that resolves to layers here, at
the config boundary, so the paper's OLMo A_f of 12 layers (0.6B) for an 18-layer backbone
is expressible. No A_f option (or af=0 / af_layers=0) is the plain backbone baseline.
"""

from __future__ import annotations

from typing import Mapping

import ml_collections


def parse_arg(arg: str | None, sizes: Mapping[str, object],
              file: str) -> tuple[str, float | None, int | None]:
  """'419m,af=2' -> ('419m', 2.0, None); '419m,af_layers=6' -> ('419m', None, 6).

  Errors name the valid choices.
  """
  usage = (f'use --config={file}:<size>[,af=<multiplier>|,af_layers=<n>] with size in '
           f'{sorted(sizes)}, e.g. --config={file}:{next(iter(sizes))},af_layers=6')
  if not arg:
    raise ValueError(f'{file} needs a size argument: {usage}')
  name, *opts = [part.strip() for part in arg.split(',')]
  if name not in sizes:
    raise ValueError(f'unknown size {name!r} in {file}: {usage}')
  af, af_layers = None, None
  for opt in opts:
    key, _, value = opt.partition('=')
    if key not in ('af', 'af_layers') or not value:
      raise ValueError(f'unknown option {opt!r} in {file}: {usage}')
    if af is not None or af_layers is not None:
      raise ValueError(f'{file}:{arg} sets the A_f size twice; give one of af= or '
                       f'af_layers=: {usage}')
    try:
      if key == 'af':
        af = float(value)
      else:
        af_layers = int(value)
    except ValueError:
      raise ValueError(f'{key}={value!r} is not a number: {usage}') from None
    if (af if af is not None else af_layers) < 0:
      raise ValueError(f'{key}={value} must be >= 0 (0 = baseline): {usage}')
  return name, af, af_layers


def af_layers_for(multiplier: float, backbone_layers: int) -> int:
  """A_f layers for `multiplier` x the backbone's non-embedding params (same width)."""
  layers = multiplier * backbone_layers
  if layers != int(layers):
    raise ValueError(f'af={multiplier:g} x {backbone_layers} backbone layers is not a whole '
                     f'number of layers; give the depth directly with af_layers=<n>')
  return int(layers)


def apply_af(c: ml_collections.ConfigDict, af: float | None, af_layers: int | None) -> None:
  """Sets fgram_model.num_layers from af_layers, or af x model.num_layers (0 = baseline)."""
  if af_layers is None:
    af_layers = af_layers_for(af or 0.0, c.model.num_layers)
  c.fgram_model.num_layers = af_layers


def af_name(c: ml_collections.ConfigDict) -> str:
  """Run-name suffix: '_af6l' for a 6-layer A_f, '' for the baseline."""
  layers = c.fgram_model.num_layers
  return f'_af{layers}l' if layers else ''


def apply_paper_optimizer(c: ml_collections.ConfigDict) -> None:
  """The paper's AdamW settings shared by its GPT-2 and OLMo runs (docs/METHOD.md, section 3).

  Peak learning rate, warmup and steps differ per family and stay in the preset files.
  """
  c.train.lr_end_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1, c.train.b2 = 0.9, 0.95
  c.train.grad_clip = 1.0


def refuse_embedded_corpus(c: ml_collections.ConfigDict) -> None:
  """Paper presets: training on the embedded stdlib corpus needs data.allow_embedded=True.

  The paper's numbers are on WebText / Dolma with the GPT-2 / GPT-NeoX-20B tokenizers; a
  paper-sized run on the small embedded corpus is almost always a missing data flag.
  """
  c.data.allow_embedded = False
