"""OLMo backbones vs SCONE: the paper's perplexity table and Table 1's zero-shot evaluation.

Perplexity (paper, 200B training tokens, avg perplexity over 11 corpora:
baselines 0.7B/1B/1.3B/1.9B (711M/1014M/1316M/1920M params); OLMo-1.3B + 10M f-grams with
A_f 0.6B (12 layers) or 1.8B (36 layers) matches the 1.9B baseline; OLMo-1B + 1B f-grams
with A_f 1.8B reaches 14.581 vs the 1.9B baseline's 14.598, at about half its inference
FLOPs and accelerator memory. Training FLOPs per 2048-token sequence: 1.9B 2.73e13,
SCONE-1B 5.57e13).

Table 1 of the paper (arXiv 2502.01637), zero-shot accuracy (%), PIQA / HellaSwag / ARC-E /
ARC-C / CSQA / MMLU / average (SCONE trained on 500B tokens, the baselines on 1T):
  OLMo-1B                   73.6 / 60.9 / 69.5 / 31.8 / 48.7 / 37.6 / 53.7
  OLMo-1.9B                 75.3 / 65.9 / 74.2 / 36.8 / 49.7 / 38.6 / 56.8
  OLMo-1B + 1B f-grams      75.3 / 67.1 / 72.5 / 36.4 / 50.8 / 39.9 / 57.0
  (averages only: OLMo-1B + OE-12.8M 54.4, OLMo-1B + 10M f-grams 54.9, OLMo-1.3B + 10M
  f-grams 56.8.)
The paper does not spell out its prompts; every point here scores the six tasks after
evaluate with OLMo's in-loop zero-shot cloze preset (`olmo`, docs/DOWNSTREAM.md), and
REPORT.md prints them under "Downstream accuracy" with the six-task average under its own
label. Convert the downloaded datasets into one directory D first (docs/DOWNSTREAM.md):
  python -m scone_jax.downstream.convert --task=piqa --input=valid.jsonl \\
      --labels=valid-labels.lst --out=D/piqa.jsonl
  (likewise hellaswag, arc_easy, arc_challenge, commonsense_qa, mmlu -> D/TASK.jsonl)
and pass --downstream_task_dir=D (gs:// for TPU and xpk); the sweep refuses to start when a
file is missing. --downstream_tasks= (empty) runs the perplexity table alone. Table 1's
budgets differ from the perplexity table's: set them with --set=train.steps=...

  python -m scone_jax.sweeps --sweep=experiments/sweeps/backbone_olmo.py --dry_run \\
      --downstream_task_dir=D
  python -m scone_jax.sweeps --sweep=experiments/sweeps/backbone_olmo.py --backend=tpu \\
      --tpu_name=NAME --zone=ZONE --root=gs://BUCKET/runs --repo=GIT_URL --report \\
      --downstream_task_dir=gs://BUCKET/tasks \\
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
# Table 1's six tasks, scored after evaluate (scone_jax/sweeps/downstream_stage.py).
DOWNSTREAM = {'tasks': ['piqa', 'hellaswag', 'arc_easy', 'arc_challenge', 'commonsense_qa',
                        'mmlu'],
              'task_dir': 'data/downstream', 'paths': ['train'], 'preset': 'olmo'}
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
