"""Every run reopens: trained with either tokenizer kind and data format, its corpus (and
tokenizer source) deleted and its directory moved, evaluate, export and generate still
work from W alone (RunDir opens the tokenizer through open_tokenizer)."""

import os
import shutil

import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from test_formats import corpus_texts, gpt2_style_tokenizer, write_parquet
from scone_jax import config as config_lib
from scone_jax import evaluate as evaluate_lib
from scone_jax import generate as generate_lib
from scone_jax import run as run_lib
from scone_jax.export import export as export_lib
from scone_jax.tokenizer import HFTokenizer, Tokenizer
from scone_jax.train import loop


def _config(inputs, kind, fmt):
  """The micro run over files under `inputs`, with tokenizer `kind` and data `fmt`."""
  train, evals = corpus_texts(inputs)
  # Host decode loop, as in test_formats' end to end: the on-device loop does not compile
  # on the tests' 8-device mesh, a serving issue outside this test's subject.
  overrides = {'train.steps': 2, 'serve.max_new_tokens': 3, 'serve.decode_loop': 'host'}
  if fmt == 'parquet':
    overrides.update({
        'data.format': 'parquet',
        'data.train_files': write_parquet(inputs / 'train.parquet', train),
        'data.eval_files': 'heldout=' + write_parquet(inputs / 'eval.parquet', evals)})
  if kind == 'huggingface':
    tok_path = gpt2_style_tokenizer(inputs / 'tokenizer.json', train, vocab_size=500)
    overrides.update({'tokenizer.kind': 'huggingface', 'tokenizer.model_file': tok_path,
                      'tokenizer.vocab_size': HFTokenizer.load(tok_path).vocab_size})
  return config_lib.from_configdict(th.micro_dict(str(inputs / 'txt'), **overrides))


@pytest.mark.parametrize('kind,fmt,tokenizer_class', [
    ('sentencepiece', 'lines', Tokenizer), ('huggingface', 'parquet', HFTokenizer),
    pytest.param('huggingface', 'lines', HFTokenizer, marks=pytest.mark.slow)])
def test_run_reopens_without_its_inputs_after_a_move(tmp_path, kind, fmt, tokenizer_class):
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  cfg = _config(inputs, kind, fmt)
  workdir = str(tmp_path / 'W')
  assert loop.train(cfg, workdir).step == 2
  shutil.rmtree(inputs)  # The corpus and the tokenizer.json it was installed from.
  moved = str(tmp_path / 'elsewhere' / 'W2')
  shutil.move(workdir, moved)

  run_dir = run_lib.RunDir(moved)
  assert isinstance(run_dir.tokenizer(), tokenizer_class)
  record = evaluate_lib.evaluate(moved)
  assert np.isfinite(record['corpora']['heldout']['loss'])
  cfg = run_dir.config()
  assert os.path.isdir(export_lib.export_store(cfg, moved, progress=False))
  out = generate_lib.generate(cfg, moved, ['the of and'])
  assert len(out.texts) == 1 and out.texts[0].startswith('the of and')
