"""Hugging Face tokenizer.json, Parquet and ArrayRecord corpora, and the paper presets'
refusal of the embedded corpus. Every tokenizer and data file is built here (no network)."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import train_helpers as th
from scone_jax import artifacts
from scone_jax import config as config_lib
from scone_jax import config_runtime
from scone_jax import prepare as prepare_lib
from scone_jax.corpus import CorpusError, Document, FileCorpus
from scone_jax.corpus import columnar
from scone_jax.tokenizer import HFTokenizer, open_tokenizer, write_shards
from scone_jax.tokenizer import spm as spm_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = '<|endoftext|>'


def gpt2_style_tokenizer(path, texts, vocab_size=400, extra_specials=()):
  """A GPT-2-format tokenizer.json: byte-level BPE whose only special is <|endoftext|>."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, *extra_specials],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.save(str(path))
  return str(path)


def corpus_texts(tmp_path):
  th.write_corpus(str(tmp_path / 'txt'))
  lines = open(tmp_path / 'txt' / 'train.txt').read().splitlines()
  return lines, open(tmp_path / 'txt' / 'eval.txt').read().splitlines()


def write_parquet(path, texts, row_group_size=200, column='text'):
  table = pa.table({column: texts, 'id': list(range(len(texts)))})
  pq.write_table(table, str(path), row_group_size=row_group_size)
  return str(path)


# --- tokenizer.kind=huggingface --------------------------------------------------------


def test_hf_tokenizer_gpt2_style(tmp_path):
  texts = ['hello world, héllo wörld', 'the cat sat on the mat'] * 50
  path = gpt2_style_tokenizer(tmp_path / 'tokenizer.json', texts)
  tok = HFTokenizer.load(path)
  vocab = json.load(open(path))['model']['vocab']
  assert tok.vocab_size == max(vocab.values()) + 1
  assert tok.fingerprint == hashlib.sha256(open(path, 'rb').read()).hexdigest()
  # GPT-2 has only <|endoftext|>: it is BOS, EOS and pad.
  eot = tok._tok.token_to_id(EOT)
  assert tok.bos_id == tok.eos_id == tok.pad_id == eot
  for text in ('hello world', '  two  spaces\nand\ttabs', 'ünïcödé ✓ 漢字', 'the mat',
               f'quoting {EOT} inside a document'):
    ids = tok.encode([text])[0]
    assert ids.dtype == np.int32 and eot not in ids  # No template specials added.
    assert tok.decode(ids) == text  # Byte-level BPE round-trips any text.


def test_hf_tokenizer_special_roles(tmp_path):
  path = gpt2_style_tokenizer(tmp_path / 't.json', ['a b c'] * 20,
                              extra_specials=('<|padding|>', '<s>'))
  tok = HFTokenizer.load(path)
  get = tok._tok.token_to_id
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (get('<s>'), get(EOT), get('<|padding|>'))
  tok = HFTokenizer.load(path, bos_token=EOT, pad_token=EOT)
  assert tok.bos_id == tok.pad_id == get(EOT)
  with pytest.raises(ValueError, match='bos_token=.*not a token'):
    HFTokenizer.load(path, bos_token='<bos>')
  nothing = gpt2_style_tokenizer(tmp_path / 'n.json', ['a b c'] * 20)
  data = json.load(open(nothing))
  data['added_tokens'] = []
  data['model']['vocab'].pop(EOT)
  open(nothing, 'w').write(json.dumps(data))
  with pytest.raises(ValueError, match='tokenizer.eos_token'):
    HFTokenizer.load(nothing)
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(artifacts.ArtifactError, match='not a valid tokenizer.json'):
    HFTokenizer.load(str(tmp_path / 'bad.json'))


def test_hf_tokenizer_install_and_open(tmp_path):
  path = gpt2_style_tokenizer(tmp_path / 'tokenizer.json', ['x y z w'] * 30, vocab_size=300)
  tok = HFTokenizer.load(path)
  cfg = config_lib.TokenizerConfig(kind='huggingface', model_file=path,
                                   vocab_size=tok.vocab_size)
  installed = spm_lib.install_tokenizer(path, cfg, str(tmp_path / 'A'), {'input_fingerprint': 'f'})
  opened = open_tokenizer(str(tmp_path / 'A'), expect={'input_fingerprint': 'f'})
  for t in (installed, opened):
    assert isinstance(t, HFTokenizer)
    assert (t.fingerprint, t.vocab_size, t.bos_id) == (tok.fingerprint, tok.vocab_size,
                                                       tok.bos_id)
  manifest = artifacts.read_manifest(str(tmp_path / 'A'), spm_lib.KIND)
  assert manifest['tokenizer_kind'] == 'huggingface' and manifest['bos_token'] == EOT
  wrong = config_lib.TokenizerConfig(kind='huggingface', model_file=path, vocab_size=50_257)
  with pytest.raises(ValueError, match=f'vocab_size={tok.vocab_size}'):
    spm_lib.install_tokenizer(path, wrong, str(tmp_path / 'B'))
  with pytest.raises(artifacts.ArtifactError, match='kind=huggingface'):
    spm_lib.Tokenizer.load(path)  # A tokenizer.json given as a sentencepiece model.


@pytest.mark.parametrize('overrides,match', [
    ({'tokenizer.kind': 'huggingface'}, 'tokenizer.model_file=/path/to/tokenizer.json'),
    ({'tokenizer.eos_token': EOT}, "kind='huggingface' only"),
    ({'data.format': 'arrayrecord_tokens', 'data.source': 'files', 'data.train_files': 'x'},
     'tokenizer that produced them'),
    ({'data.format': 'csv'}, 'not one of'),
])
def test_config_errors(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.replace(config_lib.Config(), **overrides)


# --- data.format=parquet / arrayrecord / arrayrecord_tokens ----------------------------


def test_parquet_reader_streams_rows(tmp_path):
  texts = [f'doc {i}' for i in range(450)]
  texts[3], texts[7] = None, '   '
  path = write_parquet(tmp_path / 'a.parquet', texts, row_group_size=100)
  assert pq.ParquetFile(path).num_row_groups == 5
  docs = list(FileCorpus([path], 'parquet'))
  want = [(t, f'{path}:row {i}') for i, t in enumerate(texts) if t and t.strip()]
  assert [(d.text, d.source) for d in docs] == want
  # Compressed columns: the file is far smaller than its text, the bound is not.
  repetitive = write_parquet(tmp_path / 'r.parquet', [f'{i} ' + 'same words ' * 200
                                                      for i in range(300)])
  text_bytes = sum(len(f'{i} ' + 'same words ' * 200) for i in range(300))
  assert os.path.getsize(repetitive) < text_bytes / 10
  assert FileCorpus([repetitive], 'parquet').total_file_bytes >= text_bytes
  with pytest.raises(CorpusError, match=r"no column 'body' \(columns: \['text', 'id'\]\)"):
    list(FileCorpus([path], 'parquet', text_field='body'))
  with pytest.raises(CorpusError, match="column 'id' has type int64, not string"):
    list(FileCorpus([path], 'parquet', text_field='id'))
  (tmp_path / 'b.parquet').write_text('plain text')
  with pytest.raises(CorpusError, match='not a readable Parquet file'):
    list(FileCorpus([str(tmp_path / 'b.parquet')], 'parquet'))


def test_arrayrecord_text_reader(tmp_path):
  path = str(tmp_path / 'a.array_record')
  records = [b'first doc', b'', 'ünï ✓'.encode(), b'bad \xff byte']
  columnar.write_arrayrecord(path, records)
  corpus = FileCorpus([path], 'arrayrecord')
  docs = list(corpus)
  assert [(d.text, d.source) for d in docs] == [
      ('first doc', f'{path}:record 0'), ('ünï ✓', f'{path}:record 2'),
      ('bad \ufffd byte', f'{path}:record 3')]
  assert corpus.stats.bad_utf8_chars == 1
  with pytest.raises(CorpusError, match=r'record 3: invalid UTF-8'):
    list(FileCorpus([path], 'arrayrecord', on_bad_utf8='error'))


def test_arrayrecord_tokens_reader(tmp_path):
  path = str(tmp_path / 't.array_record')
  ids = [np.array([5, 6, 7]), np.array([], int), np.array([70000, 1])]
  columnar.write_arrayrecord(path, [np.asarray(x, '<u4').tobytes() for x in ids])
  docs = list(FileCorpus([path], 'arrayrecord_tokens'))
  assert len(docs) == 2 and docs[1].source == f'{path}:record 2'
  np.testing.assert_array_equal(docs[0].ids, [5, 6, 7])
  np.testing.assert_array_equal(docs[1].ids, [70000, 1])
  columnar.write_arrayrecord(path, [b'abc'])
  with pytest.raises(CorpusError, match='not a whole number of uint32'):
    list(FileCorpus([path], 'arrayrecord_tokens'))


def test_pretokenized_shards_equal_tokenized_text(tmp_path):
  train, _ = corpus_texts(tmp_path)
  tok = HFTokenizer.load(gpt2_style_tokenizer(tmp_path / 'tok.json', train, vocab_size=500))
  texts = train[:300]
  text_path = str(tmp_path / 'text.array_record')
  columnar.write_arrayrecord(text_path, [t.encode() for t in texts])
  ids_path = str(tmp_path / 'ids.array_record')
  columnar.write_arrayrecord(ids_path, [np.asarray(x, '<u4').tobytes()
                                        for x in tok.encode(texts)])
  from_text = write_shards(str(tmp_path / 's1'), FileCorpus([text_path], 'arrayrecord'), tok,
                           'c')
  from_ids = write_shards(str(tmp_path / 's2'), FileCorpus([ids_path], 'arrayrecord_tokens'),
                          tok, 'c', batch_chars=1000)
  assert from_text.num_docs == from_ids.num_docs == 300
  for i in range(300):
    np.testing.assert_array_equal(from_ids.doc(i), tok.encode([texts[i]])[0])
    np.testing.assert_array_equal(from_text.doc(i), from_ids.doc(i))
  for key in ('num_tokens', 'num_bytes', 'num_chars'):  # bits per byte counts the same.
    assert from_text.manifest[key] == from_ids.manifest[key], key
  bad = [Document('', 'f:record 0', ids=np.array([tok.vocab_size], np.uint32))]
  with pytest.raises(ValueError, match=r"f:record 0: token id \d+ is >= the tokenizer's vocab"):
    write_shards(str(tmp_path / 's3'), bad, tok, 'c')


# --- end to end: tokenizer.json + Parquet -> prepare -> train -> ... -> generate -------


def _hf_parquet_config(tmp_path, **overrides):
  train, evals = corpus_texts(tmp_path)
  tok_path = gpt2_style_tokenizer(tmp_path / 'tokenizer.json', train, vocab_size=500)
  vocab = HFTokenizer.load(tok_path).vocab_size
  values = th.micro_dict(str(tmp_path / 'txt'), str(tmp_path / 'A'), **{
      'data.format': 'parquet',
      'data.train_files': write_parquet(tmp_path / 'train.parquet', train),
      'data.eval_files': 'heldout=' + write_parquet(tmp_path / 'eval.parquet', evals),
      'tokenizer.kind': 'huggingface', 'tokenizer.model_file': tok_path,
      'tokenizer.vocab_size': vocab, **overrides})
  return config_lib.from_configdict(values), train, evals


def test_prepare_hf_tokenizer_and_parquet(tmp_path):
  cfg, train, evals = _hf_parquet_config(tmp_path)
  prepared = prepare_lib.prepare(cfg, str(tmp_path / 'W'))
  tok = prepared.tokenizer
  assert isinstance(tok, HFTokenizer)
  assert prepared.tokenizer_fingerprint == hashlib.sha256(
      open(cfg.tokenizer.model_file, 'rb').read()).hexdigest()
  shards = prepared.train_shards
  assert shards.num_docs == len(train)
  for i in (0, 1, len(train) - 1):  # Reference: the tokenizers library on the raw text.
    np.testing.assert_array_equal(shards.doc(i), tok.encode([train[i]])[0])
  assert prepared.eval_shards['heldout'].num_docs == len(evals)
  assert len(prepared.table) > 0
  again = prepare_lib.prepare(cfg, str(tmp_path / 'W'))
  assert {'tokenizer', 'tokens/train', 'fgrams'} <= set(again.skipped)
  assert f'tokenizer: vocab {tok.vocab_size}' in prepare_lib.summary(again)
  loaded = prepare_lib.load_prepared(cfg, str(tmp_path / 'W'))
  assert loaded.tokenizer.fingerprint == tok.fingerprint and loaded.tokenizer.bos_id == tok.bos_id


@pytest.mark.slow
def test_hf_parquet_end_to_end(tmp_path):
  """prepare -> train -> evaluate -> export -> generate on a GPT-2-format tokenizer.json."""
  from scone_jax import evaluate as evaluate_lib
  from scone_jax import generate as generate_lib
  from scone_jax.export import export as export_lib
  from scone_jax.train import loop
  # The host decode loop: the on-device loop's native lookup (serve/device_loop.py) fails
  # to compile on the tests' 8-device mesh (XLA: "Side-effect HLO must have sharding"), a
  # serving issue outside this test's subject (tokenizer.json + Parquet end to end).
  cfg, _, _ = _hf_parquet_config(tmp_path, **{'serve.max_new_tokens': 4,
                                              'serve.decode_loop': 'host'})
  workdir = str(tmp_path / 'W')
  prepare_lib.prepare(cfg, workdir)
  result = loop.train(cfg, workdir)
  assert result.step == cfg.train.steps
  record = evaluate_lib.evaluate(workdir)
  assert np.isfinite(record['corpora']['heldout']['loss'])
  assert os.path.isdir(export_lib.export_store(cfg, workdir, progress=False))
  out = generate_lib.generate(cfg, workdir, ['the of and'])
  assert len(out.texts) == 1 and out.texts[0].startswith('the of and')


# --- paper presets refuse the embedded corpus ------------------------------------------


def _preset(spec):
  path, _, arg = spec.partition(':')
  loaded = importlib.util.spec_from_file_location('preset', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(loaded)
  loaded.loader.exec_module(module)
  return config_lib.from_configdict(module.get_config(arg) if arg else module.get_config())


@pytest.mark.parametrize('spec', ['experiments/gpt2.py:128m', 'experiments/gpt2.py:1099m',
                                  'experiments/olmo.py:1b,af_layers=36'])
def test_paper_presets_refuse_embedded_corpus(spec, tmp_path):
  cfg = _preset(spec)
  with pytest.raises(config_lib.ConfigError) as error:
    prepare_lib.prepare(cfg, str(tmp_path / 'W'))
  for hint in ('--config.data.source=files', '--config.data.train_files=',
               '--config.tokenizer.model_file=', '--config.data.allow_embedded=True'):
    assert hint in str(error.value)
  assert not os.listdir(tmp_path)  # Refused before anything was written.
  config_runtime.check_data_source(config_lib.replace(cfg, **{'data.allow_embedded': True}))
  config_runtime.check_data_source(config_lib.replace(
      cfg, **{'data.source': 'files', 'data.train_files': 'x.txt'}))


@pytest.mark.parametrize('spec', ['experiments/tiny.py', 'experiments/demo.py',
                                  'experiments/gpt2.py:25m', 'experiments/gpt2.py:125m'])
def test_small_presets_keep_the_embedded_corpus(spec):
  config_runtime.check_data_source(_preset(spec))


def test_train_cli_refuses_embedded_corpus(tmp_path):
  workdir = tmp_path / 'W'
  done = subprocess.run(
      [sys.executable, '-m', 'scone_jax.train', '--config=experiments/gpt2.py:128m',
       f'--workdir={workdir}'], cwd=REPO, env=th.subprocess_env(1), capture_output=True,
      text=True, timeout=300)
  assert done.returncode != 0
  assert 'refuses to train on the embedded' in done.stderr
  assert '--config.data.allow_embedded=True' in done.stderr
  assert not workdir.exists()


def test_allow_embedded_may_change_on_resume(tmp_path):
  from scone_jax.train import loop
  cfg = _preset('experiments/gpt2.py:128m')
  loop.write_run_config(config_lib.replace(cfg, **{'data.allow_embedded': True}), str(tmp_path))
  loop.write_run_config(cfg, str(tmp_path))  # The refusal flag changes no math.
  with pytest.raises(config_lib.ConfigError, match='data.format'):
    loop.write_run_config(config_lib.replace(cfg, **{'data.format': 'parquet'}), str(tmp_path))
