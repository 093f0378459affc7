"""Text generation through the host-side f-gram store.

  python -m scone_jax.generate --workdir=W --prompt="def main(" [--seed=0]
      [--config.serve.max_new_tokens=64 --config.serve.temperature=0.8
       --config.serve.top_k=40 --config.serve.top_p=0.95 --config.serve.batch_size=1
       --config.serve.store_tier=ram|disk --config.serve.decode_loop=device|host
       --config.serve.lookup=auto|native|callback|cache --config.serve.cache_rows=C
       --config.serve.tensor=N --config.serve.store_sharded=True]
      [--output=texts.json] [--config.distributed.* --config.mesh.*]
  python -m scone_jax.generate --workdir=W --accounting_only

Restores W's latest checkpoint. SCONE runs read the store written by
`python -m scone_jax.export --workdir=W`; baseline runs need none. `--config.serve.*`
overrides W/config.json's serve section (scone_jax/config.py documents each key); the rest
of the run's config is fixed. When the prompt plus max_new_tokens exceeds the model's
context (model.max_seq_len), max_new_tokens is cut to fit and stderr says so.
`--config.serve.tensor=N` decodes tensor-parallel over N of this host's devices (weights
and KV cache split by heads; the same tokens as one device). `--accounting_only` prints
accelerator-resident and offloaded parameters and FLOPs per token instead of generating.
`--output` also writes the texts and throughput as JSON (atomically).

On several processes (one command per process, `--config.distributed.*` as for
training), every process restores the run, holds the whole backbone on its own devices
and decodes the same prompts (serve/session.py); process 0 alone prints and writes
`--output`. Each process loads the whole store, or with `--config.serve.store_sharded=True`
(and `--config.serve.decode_loop=host`) only its row shards, the rows of every step
exchanged between the processes (serve/sharded_store.py): the same tokens either way.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import flags, logging

from scone_jax import artifacts, cli, restore
from scone_jax import config as config_lib
from scone_jax.config import Config
from scone_jax.serve.accounting import account, measured_af_tokens_per_token
from scone_jax.serve.sampling import Sampling
from scone_jax.serve.session import build_decoder


FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_CONFIG = cli.define_config_overrides(FLAGS)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Prompt text (repeat the flag for a batch).',
                                    flag_values=FLAGS)
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.', flag_values=FLAGS)
_ACCOUNTING_ONLY = flags.DEFINE_bool(
    'accounting_only', False, 'Print parameter/FLOP accounting of the decode step and exit.',
    flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Also write the texts, tokens/s and lookup ms/step to this JSON file '
    '(process 0, atomically).', flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  texts: list[str]  # Prompt + generated text, one per prompt.
  tokens_per_second: float
  lookup_ms_per_step: float


def generate(cfg: Config, workdir: str, prompts: list[str], seed: int = 0) -> GenerateResult:
  """Generates `cfg.serve.max_new_tokens` tokens after each prompt.

  The batch is max(serve.batch_size, number of prompts); with fewer prompts the last one
  fills the remaining rows (their outputs are not returned), so throughput is measured at
  the requested batch.
  """
  if not prompts or not all(p for p in prompts):
    raise cli.CommandLineError('give a non-empty --prompt="..." (repeat it for a batch)')
  batch_size = max(cfg.serve.batch_size, len(prompts))
  run, decoder = build_decoder(cfg, workdir, batch_size)
  tok = run.tokenizer
  ids = [np.asarray(x, np.int32) for x in tok.encode(prompts)]
  batch = ids + [ids[-1]] * (batch_size - len(ids))
  s = cfg.serve
  gen = decoder.generate(batch, _fit_context(s.max_new_tokens, ids, decoder.cache_len),
                         Sampling(s.temperature, s.top_k, s.top_p, vocab_size=tok.vocab_size),
                         seed=seed, eos_id=tok.eos_id)
  return GenerateResult(
      # Decoding prompt + continuation together keeps the tokenizer's spacing right.
      texts=[tok.decode(p.tolist() + t.tolist()) for p, t in zip(ids, gen.tokens)],
      tokens_per_second=gen.tokens_per_second,
      lookup_ms_per_step=1e3 * gen.lookup_seconds / max(gen.decode_steps, 1))


def _fit_context(max_new_tokens: int, ids: list[np.ndarray], context: int) -> int:
  """max_new_tokens, cut (with a warning) so the longest prompt plus BOS plus the new
  tokens fit the model's context; CommandLineError when the prompt alone fills it."""
  prompt_len = 1 + max(len(x) for x in ids)  # The decoder prepends BOS.
  room = context - prompt_len
  if room < 1:
    raise cli.CommandLineError(
        f'--prompt is {prompt_len} tokens (with BOS) and fills the model\'s context of '
        f'{context} tokens (model.max_seq_len); shorten the prompt')
  if max_new_tokens > room:
    logging.warning('generate: max_new_tokens=%d cut to %d: the prompt (%d tokens with BOS) '
                    'plus the new tokens must fit the model\'s context of %d tokens '
                    '(model.max_seq_len)', max_new_tokens, room, prompt_len, context)
  return min(max_new_tokens, room)


def main(argv):
  del argv
  cfg = restore.run_config(_WORKDIR.value,
                           cli.overrides(_CONFIG, ('serve',) + restore.PLACEMENT_SECTIONS))
  if _ACCOUNTING_ONLY.value:
    # XLA's cost analysis counts a scanned layer body once: unroll so it counts every layer.
    cfg = config_lib.replace(cfg, **{'model.layer_loop': 'unrolled'})
    run, decoder = build_decoder(cfg, _WORKDIR.value)
    print(account(cfg, decoder, run.vocab_size,
                  measured_af_tokens_per_token(_WORKDIR.value)).table())
    return
  result = generate(cfg, _WORKDIR.value, _PROMPT.value, _SEED.value)
  if jax.process_index() != 0:
    return  # Every process decoded the same texts; process 0 reports them.
  if _OUTPUT.value:
    artifacts.write_json_atomic(_OUTPUT.value, dataclasses.asdict(result))
  for text in result.texts:
    print(text)
  lookup = (f', host lookup {result.lookup_ms_per_step:.3f} ms/step'
            if cfg.serve.decode_loop == 'host' else '')
  print(f'[{result.tokens_per_second:.1f} tokens/s{lookup}]')


if __name__ == '__main__':
  cli.run('generate', main, FLAGS)
