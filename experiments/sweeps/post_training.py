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
14B's), its own token table and blocks from that checkpoint (fgram_model.init_from),
and a learned projection to the 4B's width. The dry run prints every arm's parameters,
memory and FLOPs from model/arm_accounting.account.

SHAPES: the backbone is Qwen3-4B exactly as config.json states it (family 'qwen3': 32
query heads and 8 K/V heads of 128 on d 2560, QK-norm per head, RMSNorm, SwiGLU, RoPE
theta 1e6, tied embeddings): the dry run prints 4.022G (Qwen3-4B: 4.02B). A_f is the 8B's or 14B's shape as config.json
states it too (32 / 40 query heads, 8 K/V heads of 128: fgram_model.num_kv_heads and
head_dim), without the output head A_f does not use (Qwen3-8B and 14B untie it) and with
the projection to the 4B's width: 7.58G / 14.01G against the released 8.19B / 14.77B
(tests/test_attach.py checks both against that arithmetic).
Real runs import the 4B from its Hugging Face directory (`--set=model.init_from=DIR_4B`,
scone_jax/hf/) and A_f from the 8B's or 14B's (`--set=fgram_model.init_from=DIR_8B`; the
same key takes one of our runs; train/init_from.py checks the shapes before any work).
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
  return {'model.family': 'qwen3', 'model.d_model': d, 'model.num_layers': layers,
          'model.num_heads': 32, 'model.num_kv_heads': 8, 'model.head_dim': HEAD_DIM,
          'model.qk_norm': 'head', 'model.mlp_dim': mlp,
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
          'fgram_model.num_heads': d // HEAD_DIM, 'fgram_model.num_kv_heads': 8,
          'fgram_model.head_dim': HEAD_DIM, 'fgram_model.mlp_dim': mlp,
          'fgram_model.combine': 'add', 'fgram_model.zero_init_out': True,
          'fgram_model.final_norm': 'same', 'fgram.size': ROWS}


def get_sweep():
  base = _backbone(*QWEN3['4b'])
  return [{**base, 'fgram_model.num_layers': 0},
          {**base, **_af('8b')},
          {**base, **_af('14b')}]
