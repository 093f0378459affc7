"""GPT-2 family presets: the paper's WebText study (docs/METHOD.md, section 3) plus two
benchmark sizes.

  python -m scone_jax.train --config=experiments/gpt2.py:419m --workdir=runs/gpt2_419m \
      --config.data.source=files --config.data.format=parquet \
      --config.data.train_files='/data/owt/train-*.parquet' \
      --config.data.eval_files='wikitext103=/data/wt103/test.parquet' \
      --config.tokenizer.kind=huggingface --config.tokenizer.model_file=/data/gpt2/tokenizer.json
  python -m scone_jax.train --config=experiments/gpt2.py:419m,af_layers=6 ...   # A_f 170M
  python -m scone_jax.train --config=experiments/gpt2.py:419m,af=3 ...          # A_f 1020M

Sizes (name: d_model, layers; params = 12 d^2 L + 50,257 d, the paper's count):
  128m: 1024, 6    204m: 1024, 12 (doubled 128m)
  419m: 1536, 12   759m: 1536, 24 (doubled 419m)
  589m: 1536, 18   1099m: 1536, 36 (doubled 589m)
  125m: 768, 12 (GPT-2 small; GPU benchmark)   25m: 512, 7, vocab 8000 (CPU benchmark)
A_f: `af_layers=<n>` layers, or `af=<multiplier>` x the backbone's depth (= x its
non-embedding params at equal width); none is the baseline. The paper's 419M model uses
A_f 170M (6 layers) and 1020M (36 layers).
Paper settings: vocab 50,257 (GPT-2's tokenizer.json through tokenizer.kind=huggingface;
without it, a sentencepiece model of that size is trained), seq 1024, batch 512, AdamW lr
2e-4 with cosine decay, weight decay 0.1, 80B tokens (152,588 steps). The paper leaves
warmup and the final lr unstated: we use 2000 steps and 0.1x.
The paper sizes refuse the embedded stdlib corpus unless --config.data.allow_embedded=True
(the benchmark sizes 125m and 25m train on it).
model.attention='auto' (the default) takes cuDNN fused flash attention on NVIDIA GPUs in
bf16: measured earlier on one H200 with --config.model.attention=cudnn, fwd+bwd, 1.46x faster
than einsum for 125m (B16 x T1024) and 0.7b (B8 x T2048, MFU 27% -> 39%).
"""

from scone_jax import config as config_lib
from scone_jax.model import presets

# name: (d_model, num_layers, num_heads)
SIZES = {
    '128m': (1024, 6, 16), '204m': (1024, 12, 16),
    '419m': (1536, 12, 24), '759m': (1536, 24, 24),
    '589m': (1536, 18, 24), '1099m': (1536, 36, 24),
    '125m': (768, 12, 12), '25m': (512, 7, 8),
}
PAPER_SIZES = ('128m', '204m', '419m', '759m', '589m', '1099m')


def get_config(arg=None):
  name, af, af_layers = presets.parse_arg(arg, SIZES, 'experiments/gpt2.py')
  d, layers, heads = SIZES[name]
  c = config_lib.base_config()
  c.model.family = 'gpt2'
  c.model.d_model, c.model.num_layers, c.model.num_heads = d, layers, heads
  c.model.tied_embeddings = True
  c.fgram.max_len = 5
  c.fgram.size = 10_000_000
  c.fgram.min_count = 5
  if name == '25m':  # CPU benchmark: the embedded corpus, fp32, short sequences.
    c.tokenizer.vocab_size = 8000
    c.model.max_seq_len = c.train.seq_len = 256
    c.train.batch_size = 16
    c.train.steps = 2000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.fgram.size = 200_000
  else:
    c.tokenizer.vocab_size = c.model.vocab_size = 50_257
    c.model.max_seq_len = c.train.seq_len = 1024
    c.model.dtype = 'bfloat16'
    c.model.remat = 'block'
    c.train.batch_size = 512
    c.train.steps = 152_588  # 80B tokens / (512 x 1024).
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 2000
    if name in PAPER_SIZES:
      presets.refuse_embedded_corpus(c)
  presets.apply_paper_optimizer(c)
  presets.apply_af(c, af, af_layers)
  c.name = f'gpt2_{name}' + presets.af_name(c)
  return c
