"""A trained run's backbone as a Hugging Face checkpoint.

  python -m scone_jax.export_hf --workdir=W --out=DIR [--max_shard_mb=5000]

Writes DIR/config.json, the weights as safetensors (sharded with
model.safetensors.index.json beyond --max_shard_mb) and DIR/tokenizer.json, loadable by
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` (and so vLLM and lm-eval).
Needs a run with a Hugging Face tokenizer (tokenizer.kind='huggingface' or
model.init_from) and a family transformers has (gpt2, llama, qwen2, qwen3, olmo, olmo2).
For a run with an f-gram side, the checkpoint is the BACKBONE ALONE: without the f-gram
embeddings it computes a different function than the run (stderr says so); SCONE's
embeddings are served from the store `python -m scone_jax.export --workdir=W` writes.
"""

from __future__ import annotations

import sys

from absl import flags
import jax
from flax import nnx

from scone_jax import cli, restore
from scone_jax.errors import UserError
from scone_jax.hf import export as hf_export
from scone_jax.hf import load as hf_load
from scone_jax.tokenizer import hf as hf_tokenizer

FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_OUT = flags.DEFINE_string('out', None, 'The Hugging Face checkpoint directory to write.',
                           flag_values=FLAGS)
_MAX_SHARD_MB = flags.DEFINE_integer('max_shard_mb', 5000, 'Largest safetensors shard (MB).',
                                     flag_values=FLAGS)


class ExportHFError(UserError, ValueError):
  """The run cannot be written as a Hugging Face checkpoint."""


def export_hf(workdir: str, out: str, max_shard_bytes: int = 5000 << 20) -> list[str]:
  """Writes W's latest backbone to `out`; returns the tensor names written."""
  cfg = restore.run_config(workdir, {})
  run = restore.load_run(cfg, workdir, with_table=False)
  if run.tokenizer.kind != hf_tokenizer.KIND_NAME:
    raise ExportHFError(f'{workdir} was trained with a {run.tokenizer.kind} tokenizer; a '
                        'Hugging Face checkpoint needs its tokenizer.json (train with '
                        "tokenizer.kind='huggingface' or model.init_from)")
  if cfg.has_fgram_side:
    print(f'export_hf: {workdir} has an f-gram side ({cfg.fgram_model.kind}); {out} holds '
          'the backbone alone, which without the f-gram embeddings is a different model. '
          'Serve the run itself with its store (python -m scone_jax.export, then generate).',
          file=sys.stderr)
  params = {hf_load.param_name(path): value for path, value in
            jax.tree_util.tree_flatten_with_path(nnx.state(run.lm.backbone, nnx.Param))[0]}
  return hf_export.write_checkpoint(out, cfg.model, run.vocab_size, params,
                                    run.tokenizer.path, max_shard_bytes)


def main(argv):
  del argv
  if not _OUT.value:
    raise cli.CommandLineError('give --out=DIR, the checkpoint directory to write')
  names = export_hf(_WORKDIR.value, _OUT.value, _MAX_SHARD_MB.value << 20)
  print(f'wrote {len(names)} tensors to {_OUT.value}')


if __name__ == '__main__':
  cli.run('export_hf', main, FLAGS)
