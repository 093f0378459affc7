"""A trained run's backbone as a Hugging Face checkpoint.

  python -m scone_jax.export_hf --workdir=W --out=DIR [--max_shard_mb=5000]

Writes DIR/config.json, the weights as safetensors (sharded with
model.safetensors.index.json beyond --max_shard_mb) and DIR/tokenizer.json, loadable by
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` (and so vLLM and lm-eval).
Needs a run with a Hugging Face tokenizer (tokenizer.kind='huggingface' or
model.init_from) and a family transformers has (gpt2, llama, qwen2, qwen3, olmo, olmo2).

For a run with an f-gram side, the checkpoint is the BACKBONE ALONE: without the f-gram
embeddings it computes a different function than the run (stderr and DIR/README.md say
so). The run's f-gram store goes beside it, DIR/fgram_store: W/export (the store
`python -m scone_jax.export` writes) when it is this checkpoint's, else exported first
(by that same writer), then linked or copied file by file from its manifest, the manifest
last. DIR/README.md names the run (config, step, S) and the command that serves the run
with its store.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import flags, logging
import jax
from flax import nnx

from scone_jax import artifacts, cli, paths, restore
from scone_jax import config as config_lib
from scone_jax.config import Config
from scone_jax.errors import UserError
from scone_jax.export import EXPORT_DIR, STORE_KIND, export_store
from scone_jax.hf import export as hf_export
from scone_jax.hf import load as hf_load
from scone_jax.serve import session
from scone_jax.tokenizer import hf as hf_tokenizer

FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_OUT = flags.DEFINE_string('out', None, 'The Hugging Face checkpoint directory to write.',
                           flag_values=FLAGS)
_MAX_SHARD_MB = flags.DEFINE_integer('max_shard_mb', 5000, 'Largest safetensors shard (MB).',
                                     flag_values=FLAGS)

STORE_DIR = 'fgram_store'  # A SCONE run's f-gram store, in the checkpoint directory.
README = 'README.md'


class ExportHFError(UserError, ValueError):
  """The run cannot be written as a Hugging Face checkpoint."""


def export_hf(workdir: str, out: str, max_shard_bytes: int = 5000 << 20) -> list[str]:
  """Writes W's latest backbone to `out` (with a SCONE run's store and README.md beside
  it); returns the tensor names written."""
  cfg = restore.run_config(workdir, {})
  run = restore.load_run(cfg, workdir, with_table=cfg.has_fgram_side)
  if run.tokenizer.kind != hf_tokenizer.KIND_NAME:
    raise ExportHFError(f'{workdir} was trained with a {run.tokenizer.kind} tokenizer; a '
                        'Hugging Face checkpoint needs its tokenizer.json (train with '
                        "tokenizer.kind='huggingface' or model.init_from)")
  params = {hf_load.param_name(path): value for path, value in
            jax.tree_util.tree_flatten_with_path(nnx.state(run.lm.backbone, nnx.Param))[0]}
  extra = None
  if cfg.has_fgram_side:
    print(f'export_hf: {workdir} has an f-gram side ({cfg.fgram_model.kind}); {out} holds '
          'the backbone alone, which without the f-gram embeddings is a different model. '
          f'The run\'s f-gram store goes to {paths.join(out, STORE_DIR)}; {README} there '
          'says how to serve the run with it.', file=sys.stderr)
    store = current_store(cfg, workdir, run)
    manifest = artifacts.read_manifest(store, STORE_KIND, verify=False)

    def extra(tmp: str) -> None:
      copy_store(store, os.path.join(tmp, STORE_DIR))
      with open(os.path.join(tmp, README), 'w') as f:
        f.write(readme(cfg, workdir, out, run.step, run.vocab_size, manifest))
  return hf_export.write_checkpoint(out, cfg.model, run.vocab_size, params,
                                    run.tokenizer.path, max_shard_bytes, extra)


def current_store(cfg: Config, workdir: str, run: restore.LoadedRun) -> str:
  """W/export, exported first unless it is this checkpoint's store (the check generate
  makes: step, table, tokenizer and weights in its manifest)."""
  try:
    session.open_checked_store(config_lib.replace(cfg, **{'serve.store_tier': 'disk'}),
                               workdir, run.step, run.table, run.tokenizer,
                               lambda: run.weights_fingerprint)
  except artifacts.ArtifactError as e:
    logging.warning('export_hf: exporting the f-gram store of step %d first (%s)',
                    run.step, e)
    export_store(cfg, workdir)
  return paths.join(paths.resolve(workdir), EXPORT_DIR)


def copy_store(store: str, dst: str) -> None:
  """The files `store`'s manifest lists into the local directory `dst`, then the manifest:
  hard links where the store is on the same local file system (exports replace a store
  whole, never a file in place), else copies; checked against the manifest's sizes."""
  manifest = artifacts.read_manifest(store, STORE_KIND, verify=False)
  for name in [*manifest['files'], artifacts.MANIFEST]:
    src, target = paths.join(store, name), os.path.join(dst, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not paths.is_remote(src):
      try:
        os.link(src, target)
        continue
      except OSError:  # Another file system (or one without links): copied.
        pass
    with paths.path(src).open('rb') as fin, open(target, 'wb') as fout:
      shutil.copyfileobj(fin, fout, 16 << 20)
  artifacts.read_manifest(dst, STORE_KIND, verify=False)


def readme(cfg: Config, workdir: str, out: str, step: int, vocab_size: int,
           manifest: dict) -> str:
  """DIR/README.md of a SCONE run's export: what the checkpoint is not, the numbers that
  name the run, and the commands that serve it."""
  m, fm = cfg.model, cfg.fgram_model
  w, out = paths.resolve(workdir), paths.resolve(out)
  cp = 'gcloud storage cp -r' if paths.is_remote(w) or paths.is_remote(out) else 'cp -r'
  table = '\n'.join(f'| {k} | {v} |' for k, v in (
      ('run', f'`{w}` (its `config.json`: name `{cfg.name}`)'),
      ('backbone', f'{m.family}, {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} '
                   f'heads ({m.kv_heads} K/V) x {m.head_size}, vocab {vocab_size}'),
      ('f-gram model', f'{fm.kind}, {fm.num_layers} layers'),
      ('checkpoint step', step),
      ('f-grams S', f'{manifest["num_rows"]} rows of {manifest["d_model"]} '
                    f'({manifest["dtype"]}) in `{STORE_DIR}/`'),
      ('store', f'table `{manifest["table_fingerprint"]}`, weights '
                f'`{manifest["weights_fingerprint"]}`')))
  return f"""# {os.path.basename(out.rstrip('/'))}: the backbone of a SCONE run

**This checkpoint is the backbone alone.** The run it comes from adds f-gram embeddings
(SCONE, `fgram_model.kind={fm.kind}`, `combine={fm.combine}`) to its token embeddings;
without them the backbone computes a different function than the trained model, so what
transformers, vLLM or lm-eval report for this directory is not the run's quality.

| | |
|---|---|
{table}

## The run's model: backbone + f-gram store, through scone_jax

```bash
python -m scone_jax.generate --workdir={w} --prompt="..."
```

generate reads the store at `{paths.join(w, EXPORT_DIR)}`; `{STORE_DIR}/` here holds the same
files and manifest. generate checks the manifest against the run's step, table, tokenizer
and weights, so where that store is gone, put this one back and serve:

```bash
{cp} {paths.join(out, STORE_DIR)} {paths.join(w, EXPORT_DIR)}
python -m scone_jax.generate --workdir={w} --prompt="..."
```

## The backbone alone, through transformers

```python
transformers.AutoModelForCausalLM.from_pretrained("{out}")
```
"""


def main(argv):
  del argv
  if not _OUT.value:
    raise cli.CommandLineError('give --out=DIR, the checkpoint directory to write')
  names = export_hf(_WORKDIR.value, _OUT.value, _MAX_SHARD_MB.value << 20)
  print(f'wrote {len(names)} tensors to {_OUT.value}')


if __name__ == '__main__':
  cli.run('export_hf', main, FLAGS)
