"""Per-arm accounting (scone_jax/model/arm_accounting.py) against hand-computed formulas,
the paper-scale comparison sweep's dry run, and XLA's count of every arm's decode step."""

import io
import os

import pytest
from flax import nnx

import tests.test_decode as dec_fix
from scone_jax import compat, config
from scone_jax import export as export_lib
from scone_jax.export import quant
from scone_jax.model import SconeLM, arm_accounting, flops, hashed, trained_table
from scone_jax.model import combine as combine_lib
from scone_jax.serve import EmbeddingStore
from scone_jax.serve import accounting as serve_accounting
from scone_jax.serve.decode import Decoder
from scone_jax.serve.hashed import HashedLookup
from scone_jax.sweeps import backends, spec
from tests.test_decode import table  # noqa: F401  (the mined-table fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, D, F, V, T, K, S = 2, 32, 128, 64, 16, 3, 100

# GPT-2 block: 4 d^2 + 2 d f matmuls, 5 d + f biases, two LayerNorms of 2 d.
BLOCK = 4 * D * D + 2 * D * F + 5 * D + F + 2 * 2 * D  # 12,704
# L blocks, final LayerNorm, tied V x d table, learned T x d positions.
BACKBONE = L * BLOCK + 2 * D + V * D + T * D  # 28,032
AF = BLOCK + K * D  # One A_f layer (final_norm 'none') and its K x d position table.
N = L * (4 * D * D + 2 * D * F)  # Backbone matmul weights.
TRAIN_BACKBONE = 6 * (N + D * V) + 12 * L * D * T
AF_PER_TOKEN = K * (6 * (4 * D * D + 2 * D * F) + 12 * 1 * D * 2 * K)  # Worst case: K per token.
INFER = 2 * (N + D * V) + 4 * L * D * T
KV = 2 * L * T * D * 4  # float32 cache per sequence.


def _cfg(**overrides):
  base = {'model.num_layers': L, 'model.d_model': D, 'model.num_heads': 2,
          'model.vocab_size': V, 'tokenizer.vocab_size': V, 'model.max_seq_len': T,
          'train.seq_len': T, 'fgram.max_len': K, 'fgram.size': S}
  return config.replace(config.from_configdict(config.base_config()), **base, **overrides)


NET = {'fgram_model.num_layers': 1}
P = trained_table.padded_rows(S)  # kind='table' trains S rows padded to ROW_MULTIPLE.
# arm overrides -> (side params, gate, host rows, bytes/row, train FLOPs, elementwise/token)
ARMS = {
    'baseline': ({}, 0, 0, 0, 0, TRAIN_BACKBONE, 0),
    'replace': (NET, AF, 0, S, 2 * D, TRAIN_BACKBONE + AF_PER_TOKEN, 0),
    'add': ({**NET, 'fgram_model.combine': 'add'}, AF, 0, S, 2 * D,
            TRAIN_BACKBONE + AF_PER_TOKEN, D),
    'gate': ({**NET, 'fgram_model.combine': 'gate'}, AF, D, S, 2 * D,
             TRAIN_BACKBONE + AF_PER_TOKEN, D),
    'int8': ({**NET, 'export.quant': 'int8'}, AF, 0, S, D + 4,
             TRAIN_BACKBONE + AF_PER_TOKEN, D),
    'fp8-f32': ({**NET, 'export.quant': 'fp8', 'export.dtype': 'float32'}, AF, 0, S, D + 4,
                TRAIN_BACKBONE + AF_PER_TOKEN, D),
    'f32': ({**NET, 'export.dtype': 'float32'}, AF, 0, S, 4 * D,
            TRAIN_BACKBONE + AF_PER_TOKEN, 0),
    'table': ({'fgram_model.kind': 'table'}, P * D, 0, S, 2 * D, TRAIN_BACKBONE, 0),
    'table-gate': ({'fgram_model.kind': 'table', 'fgram_model.combine': 'gate'}, P * D, D,
                   S, 2 * D, TRAIN_BACKBONE, D),
    'table-int8': ({'fgram_model.kind': 'table', 'export.quant': 'int8'}, P * D, 0, S,
                   D + 4, TRAIN_BACKBONE, D),
    # combine='add' is derived for hashed (config.validate): the arms never spell it.
    'hashed': ({'fgram_model.kind': 'hashed', 'fgram_model.hash_max_n': 3,
                'fgram_model.hash_buckets': 40}, 2 * 40 * D, 0, 80, 2 * D, TRAIN_BACKBONE, D),
    'hashed-4': ({'fgram_model.kind': 'hashed', 'fgram_model.hash_max_n': 4,
                  'fgram_model.hash_buckets': 10}, 3 * 10 * D, 0, 30, 2 * D, TRAIN_BACKBONE,
                 D),
}


@pytest.mark.parametrize('arm', sorted(ARMS))
def test_arm_accounting_matches_hand_formulas(arm):
  overrides, side, gate, rows, row_bytes, train_flops, extra = ARMS[arm]
  cfg = _cfg(**overrides)
  assert flops.param_counts(cfg).backbone_total == BACKBONE  # The hand count is right.
  a = arm_accounting.account(cfg)
  assert (a.backbone_params, a.side_params, a.gate_params) == (BACKBONE, side, gate)
  assert a.train_accel_params == BACKBONE + side + gate
  # float32 params: the parameter, its gradient, AdamW's mu and nu.
  assert a.train_accel_bytes == 16 * (BACKBONE + side + gate)
  assert a.infer_accel_params == BACKBONE  # The gate is folded into the store.
  assert a.infer_accel_bytes == 4 * BACKBONE
  assert a.kv_bytes_per_seq == KV
  assert (a.host_rows, a.host_bytes_per_row, a.host_bytes) == (rows, row_bytes,
                                                                rows * row_bytes)
  assert a.train_flops_per_token == train_flops
  assert a.elementwise_flops_per_token == extra
  assert a.infer_flops_per_token == INFER + extra
  # S is the mined table's rows in use; hashed arms and the baseline have no mined table.
  assert a.num_fgrams == (S if cfg.fgram_model.uses_fgram_table else 0)
  assert a.offloaded_params == rows * D
  counts = flops.param_counts(cfg)
  assert (counts.offloaded_rows, counts.offloaded) == (rows, rows * D)
  assert counts.fgram_total == side


def test_bf16_params_halve_the_accelerator_bytes():
  a = arm_accounting.account(_cfg(**{'model.param_dtype': 'bfloat16',
                                     'model.dtype': 'bfloat16', **NET}))
  assert a.train_accel_bytes == 8 * (BACKBONE + AF)
  assert a.infer_accel_bytes == 2 * BACKBONE and a.kv_bytes_per_seq == KV // 2


def test_hashed_without_buckets_is_refused_by_the_config():
  with pytest.raises(config.ConfigError, match='hash_buckets'):
    _cfg(**{'fgram_model.kind': 'hashed'})


def test_run_columns_follow_the_arm():
  table = arm_accounting.run_columns(arm_accounting.account(_cfg(**{'fgram_model.kind':
                                                                    'table'})))
  assert (table['offloaded_params'], table['S'], table['af_params']) == (S * D, S, P * D)
  hashed = arm_accounting.run_columns(arm_accounting.account(_cfg(**{
      'fgram_model.kind': 'hashed', 'fgram_model.hash_buckets': 40})))
  assert (hashed['offloaded_params'], hashed['S'], hashed['af_params']) == (
      2 * 40 * D, 0, 2 * 40 * D)
  add = arm_accounting.run_columns(arm_accounting.account(_cfg(**NET,
                                                               **{'fgram_model.combine': 'add'})))
  assert add['infer_flops'] == INFER + D  # The decode step's elementwise extra included.


def test_a_mined_table_smaller_than_requested_sets_s():
  """A finished run knows its table's rows: S = cfg.fgram.rows_used(rows)."""
  cfg = _cfg(**{'fgram_model.kind': 'table'})
  a = arm_accounting.account(cfg, table_rows=60)
  assert (a.num_fgrams, a.host_rows) == (60, 60)
  assert a.side_params == trained_table.padded_rows(60) * D
  assert arm_accounting.account(cfg, table_rows=10 * S).num_fgrams == S


def test_compare_paper_dry_run_prints_every_arm(tmp_path):
  sweep = spec.load_sweep(os.path.join(REPO, 'experiments', 'sweeps', 'compare_paper.py'),
                          str(tmp_path))
  out = io.StringIO()
  backends.dry_run(sweep, 'python', out=out)
  text = out.getvalue()
  assert not os.listdir(tmp_path)
  rows = {(r['kind'], r['combine'], r['quant']): r for r in spec.arm_rows(sweep)}
  assert set(rows) == {('baseline', '-', '-'), ('network', 'replace', 'none'),
                       ('network', 'add', 'none'), ('network', 'gate', 'none'),
                       ('network', 'replace', 'int8'), ('network', 'replace', 'fp8'),
                       ('table', 'replace', 'none'), ('hashed', 'add', 'none')}
  base = rows[('baseline', '-', '-')]
  assert base['infer_accel_params'] == pytest.approx(1014e6, rel=0.01)  # OLMo-1B.
  d, rows_10m = 2048, 10_000_000
  for key, r in rows.items():
    if key[0] == 'baseline':
      continue
    assert r['host_rows'] == rows_10m  # Every arm offloads 10M rows at inference.
    # Every arm, the gate included (folded into the store), keeps the backbone's params.
    assert r['infer_accel_params'] == base['infer_accel_params']
    assert r['host_B_per_row'] == (d + 4 if key[2] in ('int8', 'fp8') else 2 * d)
  for kind in ('table', 'hashed'):
    r = rows[(kind, 'replace' if kind == 'table' else 'add', 'none')]
    trained = trained_table.padded_rows(rows_10m) if kind == 'table' else rows_10m
    assert r['train_accel_params'] == base['train_accel_params'] + trained * d
    assert r['train_flops_tok'] == base['train_flops_tok']
  assert rows[('network', 'replace', 'none')]['train_flops_tok'] > base['train_flops_tok']
  assert 'Per arm:' in text and text.count('| hashed | add | none |') == 1


# ---- decode FLOPs: XLA's count of each arm's compiled step -----------------------------
# One check for every arm: the baseline's step plus B x what arm_accounting states (the
# combine rule's extra from combine.extra_decode_flops_per_token; for a quantised store the
# dequantisation as XLA:CPU counts it, export/quant.py, of which the stated D multiplies are
# part). tests/test_decode.py's mined table and one-device export serve every keyed arm.
XLA_D = 32
XLA_NET = {'fgram_model.num_layers': 1}
XLA_ARMS = {
    'network-replace': XLA_NET,
    'network-add': {**XLA_NET, 'fgram_model.combine': 'add'},
    'network-gate': {**XLA_NET, 'fgram_model.combine': 'gate'},
    'table-replace': {'fgram_model.kind': 'table'},
    'table-gate': {'fgram_model.kind': 'table', 'fgram_model.combine': 'gate'},
    'network-int8': {**XLA_NET, 'export.quant': 'int8'},
    'network-fp8': {**XLA_NET, 'export.quant': 'fp8'},
    'hashed': {'fgram_model.kind': 'hashed', 'fgram_model.hash_max_n': 3,
               'fgram_model.hash_buckets': 16},
}


def _xla_cfg(**overrides):
  return config.replace(config.from_configdict(config.base_config()), **{
      'model.num_layers': 2, 'model.d_model': XLA_D, 'model.num_heads': 2,
      'model.max_seq_len': 48, 'train.seq_len': 32, 'fgram.max_len': dec_fix.K,
      **overrides})


def _step_flops(decoder) -> float:
  return compat.cost_flops(decoder.compiled_decode_step())


@pytest.fixture(scope='module')
def baseline_step_flops():
  cfg = _xla_cfg()
  lm = SconeLM(cfg.model, cfg.fgram_model, fgram_max_len=dec_fix.K, vocab_size=dec_fix.V,
               rngs=nnx.Rngs(0))
  return _step_flops(Decoder(lm, batch_size=dec_fix.B, bos_id=dec_fix.BOS, loop='host'))


# table-gate repeats paths the others cover (the table's store, the gate's add): slow only.
@pytest.mark.parametrize('arm', [pytest.param(a, marks=pytest.mark.slow) if a == 'table-gate'
                                 else a for a in sorted(XLA_ARMS)])
def test_decode_step_flops_are_baseline_plus_the_stated_extra(arm, table,  # noqa: F811
                                                              baseline_step_flops, tmp_path):
  cfg = _xla_cfg(**XLA_ARMS[arm])
  fm, b = cfg.fgram_model, dec_fix.B
  lm = SconeLM(cfg.model, fm, fgram_max_len=dec_fix.K, vocab_size=dec_fix.V,
               rngs=nnx.Rngs(0), num_fgrams=len(table) if fm.kind == 'table' else 0)
  if fm.kind == 'hashed':
    path = str(tmp_path / 'export')
    export_lib.export_hashed(
        lm, path, config.ExportConfig(dtype='float32', chunk_rows=8),
        {**export_lib.store_meta(0, hashed.hash_fingerprint(fm.hash_max_n, fm.hash_buckets),
                                 'tok', 'w'), **export_lib.hashed_meta(cfg)},
        progress=False)
    store = EmbeddingStore.open(path, 'ram')
    # The decoder recognises a hashed store from its manifest (serve/factory.py).
    decoder = Decoder(lm, store, batch_size=b, bos_id=dec_fix.BOS, loop='host')
    assert isinstance(decoder.lookup, HashedLookup)
  else:
    path = dec_fix.export_one_device(lm, table, tmp_path, dtype='float32',
                                     quant=cfg.export.quant)
    decoder = Decoder(lm, EmbeddingStore.open(path, 'ram'), table, batch_size=b,
                      bos_id=dec_fix.BOS, loop='host')
  a = arm_accounting.account(cfg, vocab_size=dec_fix.V)
  quantised = cfg.export.quant != 'none'
  assert a.combine_flops_per_token == combine_lib.extra_decode_flops_per_token(
      fm.combine, XLA_D)
  assert a.dequant_flops_per_token == (XLA_D if quantised else 0)
  dequant_xla = quant.dequant_xla_flops_per_row(XLA_D, cfg.export.quant) if quantised else 0
  assert dequant_xla >= a.dequant_flops_per_token  # XLA counts the converts too.
  extra = b * (a.combine_flops_per_token + dequant_xla)
  assert _step_flops(decoder) == baseline_step_flops + extra, arm
  # generate --accounting_only's figures for this decoder: the same accounting at the
  # store's S, the backbone alone on the device, XLA's count per token.
  served = serve_accounting.account(cfg, decoder, dec_fix.V)
  rows = len(table) if fm.uses_fgram_table else (fm.hash_max_n - 1) * fm.hash_buckets
  assert served.arm == arm_accounting.account(cfg, dec_fix.V, table_rows=rows)
  assert served.arm.host_rows == served.offloaded_params // XLA_D == rows
  assert served.accelerator_params == a.infer_accel_params
  assert served.xla_flops_per_token * b == baseline_step_flops + extra
  printed = served.table()
  assert f'{a.infer_flops_per_token:.4g}' in printed and f'{rows:,}' in printed
  # The arms differ: the check is not vacuous for the rules that cost something.
  assert (extra > 0) == (arm not in ('network-replace', 'table-replace'))
