"""OLMo backbones vs SCONE (paper, 200B training tokens, avg perplexity over 11 corpora:
baselines 0.7B/1B/1.3B/1.9B (711M/1014M/1316M/1920M params); OLMo-1.3B + 10M f-grams with
A_f 0.6B (12 layers) or 1.8B (36 layers) matches the 1.9B baseline; OLMo-1B + 1B f-grams
with A_f 1.8B reaches 14.581 vs the 1.9B baseline's 14.598, at about half its inference
FLOPs and accelerator memory. Training FLOPs per 2048-token sequence: 1.9B 2.73e13,
SCONE-1B 5.57e13).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/backbone_olmo.py --dry_run
  python -m scone_jax.sweeps --sweep=experiments/sweeps/backbone_olmo.py --backend=tpu \\
      --tpu_name=NAME --zone=ZONE --root=gs://BUCKET/runs --repo=GIT_URL --report \\
      --set=data.source=files --set=data.format=parquet \\
      --set=data.train_files='/data/dolma/*.parquet' \\
      --set=tokenizer.kind=huggingface --set=tokenizer.model_file=/data/neox/tokenizer.json

A_f sizes are layer counts at d 2048 (12 d^2 = 50.3M params per layer): 12 layers = 0.6B,
36 = 1.8B, not multiples of the backbone's depth. Every point: GPT-NeoX-20B tokenizer
(50,280 ids, padded to 50,304), seq 2048, batch 2048, 47,684 steps (200B tokens), the
OLMo-1B optimizer (AdamW lr 4e-4, betas 0.9/0.95, wd 0.1, warmup 2000, cosine to 0.1x, clip
1.0, bf16). One seed, as the paper.
"""

BASE_CONFIG = 'experiments/olmo.py:0.7b'
# Paper name: layers (d_model 2048 throughout).
LAYERS = {'0.7b': 12, '1b': 18, '1.3b': 24, '1.9b': 36}
AF_LAYERS = {'0.6b': 12, '1.8b': 36}


def get_sweep():
  points = [{'model.num_layers': n, 'fgram_model.num_layers': 0} for n in LAYERS.values()]
  # OLMo-1.3B + 10M f-grams with the 0.6B and the 1.8B A_f.
  points += [{'model.num_layers': LAYERS['1.3b'], 'fgram_model.num_layers': AF_LAYERS[af],
              'fgram.size': 10_000_000} for af in ('0.6b', '1.8b')]
  # OLMo-1B + 1B f-grams with the 1.8B A_f (the paper's SCONE-1B).
  points.append({'model.num_layers': LAYERS['1b'], 'fgram_model.num_layers': AF_LAYERS['1.8b'],
                 'fgram.size': 1_000_000_000})
  return points
