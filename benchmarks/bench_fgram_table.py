"""The paper's argument against a directly trained f-gram table (fgram_model.kind='table').

  python benchmarks/bench_fgram_table.py                       # embedded corpus, study preset
  python benchmarks/bench_fgram_table.py --use_sizes=2048,16384 --steps=600

Two costs, measured on the same f-gram keys A_f uses:
* Training memory of the table: parameter + AdamW state (two moments) bytes of the [S, d]
  rows, read from the real optimizer's abstract state (jax.eval_shape of tx.init), at the
  preset's S and at paper scale (d = 2048, the OLMo runs), next to the A_f it replaces
  (experiments/olmo.py:1b,af_layers=36, the paper's 1.8B A_f, and af_layers=12, 0.6B).
* Update sparsity: the fraction of table rows with a nonzero gradient per step, on the
  real training batches of the preset (the embedded stdlib corpus unless overridden): the
  distinct f-grams of each batch (`fgram_row_ids_RxW`). For the first --grad_steps steps
  the real gradient of the loss is taken and its nonzero rows must be exactly those ids.
  Every row still moves every step under AdamW (moments decay, weight decay applies to
  all rows), so the optimizer's work and state stay dense however sparse the gradient.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from scone_jax import batches
from scone_jax import compat
from scone_jax import config as config_lib
from scone_jax import prepare as prepare_lib
from scone_jax.model import flops as flops_lib, trained_table
from scone_jax.sweeps import spec as spec_lib
from scone_jax.train import optimizer as optimizer_lib
from scone_jax.train import step as step_lib

_CONFIG = flags.DEFINE_string('config', 'experiments/demo.py:study', 'Preset (file[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/bench_fgram_table', 'Where the preset\'s '
                               'corpus is prepared (tokenizer, shards, f-gram table).')
_SIZES = flags.DEFINE_list('use_sizes', ['128', '2048', '16384'], 'S values (table rows).')
_STEPS = flags.DEFINE_integer('steps', 100, 'Training batches per S.')
_GRAD_STEPS = flags.DEFINE_integer('grad_steps', 2, 'Steps whose real gradient is checked.')
_PAPER_S = (10_000_000, 100_000_000, 1_000_000_000)
_PAPER_D = 2048


def _state_bytes(rows: int, d: int, cfg: config_lib.Config) -> tuple[int, int]:
  """(param bytes, AdamW state bytes) of a [rows, d] table under the run's optimizer."""
  tx = optimizer_lib.make_optimizer(cfg.train)
  param = jax.ShapeDtypeStruct((rows, d), jnp.dtype(cfg.model.param_dtype))
  state = jax.eval_shape(tx.init, {'rows': param})
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return nbytes(param), nbytes(state)


def _olmo_af(layers: int) -> tuple[int, config_lib.Config]:
  values = spec_lib.load_base_config(f'experiments/olmo.py:1b,af_layers={layers}')
  cfg = config_lib.from_configdict(values)
  return flops_lib.param_counts(cfg).fgram_total, cfg


def memory(cfg: config_lib.Config) -> None:
  print('\n=== training memory of the table: params + AdamW moments (fp32) ===')
  print(f'{"where":<30} {"S (rows P)":>30} {"d":>5} {"params GB":>10} {"+AdamW GB":>10} '
        f'{"x A_f 1.8B":>11}')
  af_params, af_cfg = _olmo_af(36)
  af_p, af_s = _state_bytes(af_params, 1, af_cfg)
  rows = [('preset ' + cfg.name, int(s), cfg.model.d_model, cfg) for s in _SIZES.value]
  rows += [('paper (OLMo d=2048)', s, _PAPER_D, af_cfg) for s in _PAPER_S]
  for where, s, d, c in rows:
    rows_p = trained_table.padded_rows(s)
    p, st = _state_bytes(rows_p, d, c)
    print(f'{where:<30} {f"{s:,} ({rows_p:,})":>30} {d:>5} {p / 1e9:>10.4g} '
          f'{(p + st) / 1e9:>10.4g} {(p + st) / (af_p + af_s):>11.3g}')
  for layers in (12, 36):
    n, c = _olmo_af(layers)
    p, st = _state_bytes(n, 1, c)
    print(f'{f"A_f {layers} layers ({n / 1e9:.2f}B)":<30} {"any":>30} {_PAPER_D:>5} '
          f'{p / 1e9:>10.4g} {(p + st) / 1e9:>10.4g} {(p + st) / (af_p + af_s):>11.3g}')


def sparsity(cfg: config_lib.Config) -> None:
  prepared = prepare_lib.prepare(cfg, _WORKDIR.value)
  table = prepared.table
  mesh = compat.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  print(f'\n=== update sparsity: rows with a nonzero gradient per step ({cfg.name}, '
        f'batch {cfg.train.batch_size} x {cfg.train.seq_len}, {_STEPS.value} steps, table '
        f'of {len(table)} mined f-grams) ===')
  print(f'{"S":>7} {"rows/step mean":>15} {"min":>7} {"max":>7} {"frac/step":>10} '
        f'{"touched after all":>18} {"matched pos":>12} {"grad check":>11}')
  for size in (int(s) for s in _SIZES.value):
    s_cfg = config_lib.replace(cfg, **{'fgram.use_size': min(size, len(table))})
    num = s_cfg.fgram.rows_used(len(table))
    it = batches.make_train_iterator(s_cfg, prepared.train_shards, table,
                                     bos_id=prepared.tokenizer.bos_id)
    checked = 'n/a'
    if _GRAD_STEPS.value:
      graphdef, state, _ = step_lib.create_train_state(s_cfg, mesh, prepared.tokenizer.vocab_size,
                                                       s_cfg.fgram.max_len, table)
      grad_rows = _grad_rows_fn(graphdef, state)
    per_step, matched, seen = [], [], np.zeros(num, bool)
    for step in range(_STEPS.value):
      batch, stats = batches.split_stats(next(it))
      ids = batch['fgram_row_ids_RxW']
      ids_G = np.unique(ids[ids >= 0])
      per_step.append(ids_G.size)
      matched.append(stats['fgram_matched_frac'])
      seen[ids_G] = True
      if step < _GRAD_STEPS.value:
        nonzero = np.flatnonzero(grad_rows(batch))
        if not np.array_equal(nonzero, ids_G):
          raise AssertionError(f'S={num} step {step}: {nonzero.size} rows have gradient, '
                               f'{ids_G.size} f-grams are in the batch')
        checked = f'{_GRAD_STEPS.value} steps ok'
    per_step = np.asarray(per_step)
    print(f'{num:>7} {per_step.mean():>15.1f} {per_step.min():>7} {per_step.max():>7} '
          f'{per_step.mean() / num:>10.3%} {seen.mean():>18.1%} {np.mean(matched):>12.1%} '
          f'{checked:>11}')


def _grad_rows_fn(graphdef, state):
  """batch -> bool [S]: the table rows whose loss gradient is nonzero."""
  num = nnx.merge(graphdef, state.params, state.other).fgram_model.num_fgrams

  @jax.jit
  def grad_rows(params, batch):
    def loss(params):
      logits = nnx.merge(graphdef, params, state.other)(batch)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets_BxT'])
      return (nll * batch['weights_BxT']).sum()
    g = jax.grad(loss)(params)['fgram_model']['rows'][...]
    return jnp.any(g != 0, axis=1)[:num]
  return lambda batch: np.asarray(grad_rows(state.params, batch))


def main(argv):
  del argv
  values = spec_lib.load_base_config(_CONFIG.value)
  cfg = config_lib.from_configdict(spec_lib.apply_overrides(values, {
      'fgram_model.kind': 'table', 'fgram_model.num_layers': 0,
      'train.data_prefetch': 0}, '--config'))
  print(f'devices: {jax.devices()[0].device_kind}; load: {os.getloadavg()[0]:.1f}')
  memory(cfg)
  sparsity(cfg)


if __name__ == '__main__':
  app.run(main)
