"""Perplexity vs number of f-grams S (paper, WebText: S from 512K to 100M for the 128M,
419M and 589M models, A_f at 1x each backbone's non-embedding params; ppl falls as S grows,
and at S = 100M SCONE matches the doubled baselines 204M/759M/1099M, which are in
backbone_gpt2.py).

  python -m scone_jax.sweeps --sweep=experiments/sweeps/num_fgrams.py --dry_run
  python -m scone_jax.sweeps --sweep=experiments/sweeps/num_fgrams.py --backend=tpu \\
      --tpu_name=NAME --zone=ZONE --root=gs://BUCKET/runs --repo=GIT_URL --report \\
      --set=data.source=files --set=data.format=parquet \\
      --set=data.train_files='/data/owt/train-*.parquet' \\
      --set=data.eval_files='wikitext103=/data/wt103/test.parquet' \\
      --set=tokenizer.kind=huggingface --set=tokenizer.model_file=/data/gpt2/tokenizer.json

The paper does not list its S grid (its x axis spans 1e6..1e8): we use 512K, 1M, 2M, 4M,
10M, 20M (the K ablation's S) and 100M. One table is mined at the largest S (fgram.size);
every point trains on a prefix of it (fgram.use_size), so mining happens once for all three
backbones (same tokenizer, corpus and K). S = 0 is each plain backbone. One seed, as the
paper (set SEEDS for more). 80B training tokens per point (the preset's 152,588 steps of
512 x 1024), GPT-2 tokenizer, seq 1024, AdamW 2e-4 cosine, wd 0.1.
"""

BASE_CONFIG = 'experiments/gpt2.py:419m'
LARGEST = 100_000_000
NUM_FGRAMS = (2**19, 2**20, 2**21, 2**22, 10_000_000, 20_000_000, LARGEST)
# Paper name: (d_model, layers, heads).
BACKBONES = {'128m': (1024, 6, 16), '419m': (1536, 12, 24), '589m': (1536, 18, 24)}
SEEDS = (0,)


def backbone(name):
  d, layers, heads = BACKBONES[name]
  return {'model.d_model': d, 'model.num_layers': layers, 'model.num_heads': heads}


def get_sweep():
  points = []
  for name, (_, layers, _) in BACKBONES.items():
    common = {**backbone(name), 'fgram.size': LARGEST}
    for seed in SEEDS:
      seed_key = {'train.seed': seed} if len(SEEDS) > 1 else {}
      points.append({**common, **seed_key, 'fgram_model.num_layers': 0})
      points += [{**common, **seed_key, 'fgram_model.num_layers': layers,
                  'fgram.use_size': s} for s in NUM_FGRAMS]
  return points
