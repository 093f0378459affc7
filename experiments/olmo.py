"""OLMo family presets: the paper's OLMo study (docs/METHOD.md, section 3, "OLMo").

  python -m scone_jax.train --config=experiments/olmo.py:1b --workdir=runs/olmo_1b \
      --config.data.source=files --config.data.format=parquet \
      --config.data.train_files='/data/dolma/*.parquet' \
      --config.tokenizer.kind=huggingface \
      --config.tokenizer.model_file=/data/gpt-neox-20b/tokenizer.json
  python -m scone_jax.train --config=experiments/olmo.py:1b,af_layers=36 ...    # A_f 1.8B
  python -m scone_jax.train --config=experiments/olmo.py:1.3b,af_layers=12 ...  # A_f 0.6B

Sizes: 0.7b/1b/1.3b/1.9b = d 2048 with 12/18/24/36 layers, reported as 711M/1014M/1316M/
1920M params. Those counts fit 12 d^2 per layer, i.e. a plain 4d (8192) MLP, not SwiGLU,
so the presets use a GELU MLP of width 8192; plus a 50,304 x 2048 tied embedding.
A_f: `af_layers=<n>` layers (the paper: 12 = 0.6B, 36 = 1.8B), or `af=<multiplier>` x the
backbone's depth; none is the baseline. Tokenizer: OLMo's release of GPT-NeoX-20B's
tokenizer.json (50,280 ids, padded to 50,304 in the model; EleutherAI's own file has 50,277:
then pass --config.tokenizer.vocab_size=50277). These presets refuse the embedded stdlib corpus unless
--config.data.allow_embedded=True.
OLMo-1 style: RoPE, non-parametric LayerNorm, no biases. Training: seq 2048, AdamW lr 4e-4,
betas 0.9/0.95, wd 0.1, warmup 2000, cosine to 0.1x, clip 1.0, bf16 compute, batch 2048 x
2048 tokens (OLMo-1B's ~4M) for 200B tokens (47,684 steps).
model.attention='auto' (the default) takes cuDNN fused flash attention on NVIDIA GPUs in
bf16: measured earlier on one H200 with --config.model.attention=cudnn, fwd+bwd, 1.46x faster
than einsum for 125m (B16 x T1024) and 0.7b (B8 x T2048, MFU 27% -> 39%).
"""

from scone_jax import config as config_lib
from scone_jax.model import presets

SIZES = {'0.7b': 12, '1b': 18, '1.3b': 24, '1.9b': 36}


def get_config(arg=None):
  name, af, af_layers = presets.parse_arg(arg, SIZES, 'experiments/olmo.py')
  c = config_lib.base_config()
  c.model.family = 'olmo'
  c.model.d_model, c.model.num_layers, c.model.num_heads = 2048, SIZES[name], 16
  c.model.mlp_dim = 8192
  c.model.mlp_activation = 'gelu'
  c.model.norm = 'nonparametric'
  c.model.position = 'rope'
  c.model.tied_embeddings = True
  c.model.vocab_size = 50_304  # OLMo's 50,280-token vocab padded to a multiple of 64.
  c.tokenizer.vocab_size = 50_280
  c.model.max_seq_len = c.train.seq_len = 2048
  c.model.dtype = 'bfloat16'
  c.model.remat = 'block'
  c.fgram.max_len = 5
  c.fgram.size = 10_000_000
  c.fgram.min_count = 5
  c.train.batch_size = 2048
  c.train.steps = 47_684  # 200B tokens / (2048 x 2048).
  c.train.learning_rate = 4e-4
  c.train.warmup_steps = 2000
  presets.apply_paper_optimizer(c)
  presets.refuse_embedded_corpus(c)
  presets.apply_af(c, af, af_layers)
  c.name = f'olmo_{name}' + presets.af_name(c)
  return c
