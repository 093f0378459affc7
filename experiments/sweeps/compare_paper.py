"""The competing input-embedding arms at paper scale: OLMo-1B + 10M f-gram rows (issue 14).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/compare_paper.py --dry_run
  python -m scone_jax.sweeps --sweep=experiments/sweeps/compare_paper.py --backend=tpu \\
      --tpu_name=NAME --zone=ZONE --root=gs://BUCKET/runs --repo=GIT_URL --report \\
      --set=data.source=files --set=data.format=parquet \\
      --set=data.train_files='/data/dolma/*.parquet' \\
      --set=tokenizer.kind=huggingface --set=tokenizer.model_file=/data/neox/tokenizer.json

The paper's final comparison (OE-12.8M: 54.4 average vs 54.9 for 1B + 10M f-grams) as one
sweep, one point per arm, every arm with 10M offloaded rows of d = 2048 at inference so
the accelerator holds the same OLMo-1B backbone (the gate is folded into the store):
  baseline             OLMo-1B alone
  network / replace    SCONE, A_f 0.6B (12 layers), the paper's rule
  network / add, gate  the other combine rules (fgram_model.combine)
  network / int8, fp8  SCONE with a quantised store (export.quant)
  table                a directly trained [10M, 2048] table on the same f-gram keys
  hashed               Over-Encoding-style tables of orders 2..3, 5M buckets each
                       (m (n - 1) = 10M rows)
The dry run prints each arm's accelerator params and memory in training (the table and
hashed arms train 20.5G parameters with AdamW state on the accelerator) and at inference,
the host store's bytes (int8/fp8: d + 4 bytes per row instead of 2 d) and FLOPs per token.
Every point: the OLMo-1B preset (experiments/olmo.py: seq 2048, batch 2048, 47,684 steps
= 200B tokens, AdamW 4e-4, bf16). One seed, as the paper.
"""

BASE_CONFIG = 'experiments/olmo.py:1b'
AF_LAYERS = 12  # A_f 0.6B at d 2048 (experiments/sweeps/backbone_olmo.py).
ROWS = 10_000_000
HASH_MAX_N = 3


def get_sweep():
  net = {'fgram_model.num_layers': AF_LAYERS, 'fgram.size': ROWS}
  return [
      {'fgram_model.num_layers': 0},
      {**net, 'fgram_model.combine': 'replace'},
      {**net, 'fgram_model.combine': 'add'},
      {**net, 'fgram_model.combine': 'gate'},
      {**net, 'export.quant': 'int8'},
      {**net, 'export.quant': 'fp8'},
      {'fgram_model.num_layers': 0, 'fgram_model.kind': 'table', 'fgram.size': ROWS},
      {'fgram_model.num_layers': 0, 'fgram_model.kind': 'hashed',
       'fgram_model.hash_max_n': HASH_MAX_N,
       'fgram_model.hash_buckets': ROWS // (HASH_MAX_N - 1)},
  ]
