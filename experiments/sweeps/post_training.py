"""Post-training (the paper's App. E.3): SCONE attached to a pretrained Qwen3-4B, fine-tuned.

  python -m scone_jax.sweeps --sweep=experiments/sweeps/post_training.py --dry_run

The paper fine-tunes (SFT) Qwen3-4B with 10M f-grams and an f-gram model A_f initialised
from a larger pretrained model, the 8B or the 14B of the same family:
                         AIME 2024   LiveCodeBench   decode ms/token
  Qwen3-4B (SFT)           45.3          30.8            10.05
  + SCONE, A_f 8B          48.3          34.5            10.13
  + SCONE, A_f 14B         51.6          36.3            10.13
Decode costs the same for both A_f sizes: A_f runs once, offline (export), and decoding
reads one precomputed row per f-gram from host memory (docs/METHOD.md, "Post-training").

Points: the SFT baseline (the backbone alone) and the two SCONE arms. Each SCONE arm
attaches A_f with combine='add' and a zero-initialised projection (fgram_model.
zero_init_out), so step 0 is exactly the pretrained 4B; A_f has its own width (the 8B's or
14B's), its own token table and blocks from that checkpoint (fgram_model.init_from_run),
and a learned projection to the 4B's width. The dry run prints every arm's parameters,
memory and FLOPs from model/arm_accounting.account.

NEAREST EXPRESSIBLE SHAPES: Qwen3 uses grouped-query attention (8 KV heads), a head dim of
128 independent of d_model / heads (4B: 32 heads x 128 on d 2560) and QK-norm; this config
system has none of them yet (issue 25 items 1-2), so the presets below keep d_model, depth,
MLP width, vocabulary, RMSNorm, SwiGLU and RoPE exact and take num_heads = d_model / 128
(head dim 128, full multi-head K/V). The attention projections are then counted as 4 d^2
per layer instead of Qwen3's (2 d + 2 * 8 * 128) * H * 128. The dry run prints 4.022G
for the 4B (Qwen3-4B: 4.02B; its attention happens to have exactly 4 d^2 weights) and A_f
params of 8.49G / 15.68G for the 8B / 14B (Qwen3: 8.19B / 14.77B with untied heads, which
A_f does not use; the excess is the full K/V projections): +3.6% / +6.2%
(tests/test_attach.py). Update the presets to num_kv_heads / head_dim / qk_norm once those
keys exist.
Real runs also need the checkpoints imported (`model.init_from` / `fgram_model.init_from`
for Hugging Face directories, issue 25 item 2); with our own runs as the sources today:
  --set=train.init_from_run=RUN_4B --set=fgram_model.init_from_run=RUN_8B
The CPU-scale version of this sweep: experiments/sweeps/post_training_micro.py.
"""

BASE_CONFIG = 'experiments/olmo.py:1b'
ROWS = 10_000_000  # 10M f-grams.
# Qwen3 shapes (config.json of Qwen/Qwen3-{4B,8B,14B}): d_model, layers, MLP width.
QWEN3 = {'4b': (2560, 36, 9728), '8b': (4096, 36, 12288), '14b': (5120, 40, 17408)}
HEAD_DIM = 128
VOCAB = 151_936
# SFT: seq 8192 and a global batch of 64 sequences, 3 epochs of a ~100k-example set
# (App. E.3 states the data and the models, not these; they are typical of Qwen3 SFT).
SEQ_LEN, BATCH, STEPS = 8192, 64, 5000


def _backbone(d: int, layers: int, mlp: int) -> dict:
  return {'model.family': 'olmo', 'model.d_model': d, 'model.num_layers': layers,
          'model.num_heads': d // HEAD_DIM, 'model.mlp_dim': mlp,
          'model.mlp_activation': 'swiglu', 'model.norm': 'rmsnorm',
          'model.position': 'rope', 'model.rope_theta': 1_000_000.0,
          'model.tied_embeddings': True, 'model.vocab_size': VOCAB,
          'tokenizer.vocab_size': VOCAB, 'model.max_seq_len': SEQ_LEN,
          'train.seq_len': SEQ_LEN, 'train.batch_size': BATCH, 'train.steps': STEPS,
          'train.learning_rate': 1e-5, 'train.warmup_steps': 100,
          'data.format': 'chat'}


def _af(size: str) -> dict:
  d, layers, mlp = QWEN3[size]
  return {'fgram_model.num_layers': layers, 'fgram_model.d_model': d,
          'fgram_model.num_heads': d // HEAD_DIM, 'fgram_model.mlp_dim': mlp,
          'fgram_model.combine': 'add', 'fgram_model.zero_init_out': True,
          'fgram_model.final_norm': 'same', 'fgram.size': ROWS}


def get_sweep():
  base = _backbone(*QWEN3['4b'])
  return [{**base, 'fgram_model.num_layers': 0},
          {**base, **_af('8b')},
          {**base, **_af('14b')}]
