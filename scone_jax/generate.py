"""Text generation through the host-side f-gram store.

  python -m scone_jax.generate --workdir=W --prompt="def main(" [--max_new_tokens=64
      --temperature=0.8 --top_k=40 --top_p=0.95 --batch_size=1 --store_tier=ram|disk
      --decode_loop=device|host --lookup=auto|native|callback|cache --cache_rows=C --seed=0] [--accounting_only]

Restores W's latest checkpoint. SCONE runs read the store written by
`python -m scone_jax.export --workdir=W`; baseline runs need none. Unset flags take
config.serve's values from W/config.json. `--accounting_only` prints accelerator-resident
and offloaded parameters and FLOPs per token instead of generating.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import app, flags

from scone_jax import logs, restore
from scone_jax import config as config_lib
from scone_jax.config import Config
from scone_jax.serve.accounting import account, measured_af_tokens_per_token
from scone_jax.serve.sampling import Sampling
from scone_jax.serve.session import build_decoder


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
    raise ValueError('give a non-empty --prompt')
  batch_size = max(cfg.serve.batch_size, len(prompts))
  run, decoder = build_decoder(cfg, workdir, batch_size)
  tok = run.tokenizer
  ids = [np.asarray(x, np.int32) for x in tok.encode(prompts)]
  batch = ids + [ids[-1]] * (batch_size - len(ids))
  s = cfg.serve
  gen = decoder.generate(batch, s.max_new_tokens, Sampling(s.temperature, s.top_k, s.top_p,
                                                          vocab_size=tok.vocab_size),
                         seed=seed, eos_id=tok.eos_id)
  return GenerateResult(
      # Decoding prompt + continuation together keeps the tokenizer's spacing right.
      texts=[tok.decode(p.tolist() + t.tolist()) for p, t in zip(ids, gen.tokens)],
      tokens_per_second=gen.tokens_per_second,
      lookup_ms_per_step=1e3 * gen.lookup_seconds / max(gen.decode_steps, 1))


def main(argv):
  del argv
  logs.quiet_third_party_logs()
  f = flags.FLAGS
  names = ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'batch_size', 'store_tier',
           'decode_loop', 'lookup', 'cache_rows')
  overrides = {f'serve.{n}': getattr(f, n) for n in names if getattr(f, n) is not None}
  cfg = restore.run_config(f.workdir, overrides)
  if f.accounting_only:
    # XLA's cost analysis counts a scanned layer body once: unroll so it counts every layer.
    cfg = config_lib.replace(cfg, **{'model.layer_loop': 'unrolled'})
    run, decoder = build_decoder(cfg, f.workdir)
    print(account(cfg, decoder, run.vocab_size,
                  measured_af_tokens_per_token(f.workdir)).table())
    return
  result = generate(cfg, f.workdir, f.prompt, f.seed)
  for text in result.texts:
    print(text)
  lookup = (f', host lookup {result.lookup_ms_per_step:.3f} ms/step'
            if cfg.serve.decode_loop == 'host' else '')
  print(f'[{result.tokens_per_second:.1f} tokens/s{lookup}]')


def define_flags() -> None:
  """The CLI flags; defined only when run as a program, so importing never adds them."""
  flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
  flags.DEFINE_multi_string('prompt', [], 'Prompt text (repeat the flag for a batch).')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate (default config.serve).')
  flags.DEFINE_float('temperature', None, '0 = greedy.')
  flags.DEFINE_integer('top_k', None, '0 = off.')
  flags.DEFINE_float('top_p', None, '1.0 = off.')
  flags.DEFINE_integer('batch_size', None, 'Rows decoded together.')
  flags.DEFINE_enum('store_tier', None, ['ram', 'disk'], 'Where the f-gram table is read.')
  flags.DEFINE_enum('decode_loop', None, ['device', 'host'],
                    'On-device generation loop or one jitted step per token.')
  flags.DEFINE_enum('lookup', None, ['auto', 'native', 'callback', 'cache'],
                    "SCONE's lookup inside the device loop (auto: native on CPU + ram; "
                    'cache: device match + cache_rows hot rows on the device).')
  flags.DEFINE_integer('cache_rows', None, "Rows of lookup='cache''s device cache.")
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_bool('accounting_only', False,
                    'Print parameter/FLOP accounting of the decode step and exit.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
