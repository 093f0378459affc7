"""Tokenizer train/load/fingerprint/round trip, long-document policy, and token shards."""

import hashlib
import os
import random
import re

import numpy as np
import pytest

from scone_jax import artifacts
from scone_jax.config import ConfigError, TokenizerConfig
from scone_jax.corpus import CorpusError, Document, FileCorpus
from scone_jax.tokenizer import (TokenShards, Tokenizer, install_tokenizer, open_tokenizer,
                                 split_long, token_dtype, train_tokenizer, write_shards)

_WORDS = ('the quick brown fox jumps over lazy dog data model token embedding layer '
          'scaling frequent grams über naïve 数据 ☃').split()


def _docs(n=400, seed=0):
  rng = random.Random(seed)
  return [Document(' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 30))) +
                   ('\n\nsecond  paragraph\tx' if i % 7 == 0 else ''), f'mem:{i + 1}')
          for i in range(n)]


_CFG = TokenizerConfig(vocab_size=320, model_type='bpe', train_chars=1_000_000)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tok') / 'tokenizer')
  train_tokenizer(_docs(), _CFG, out, total_bytes=10**5, meta={'input_fingerprint': 'x'})
  return out


def test_train_writes_model_manifest_and_fingerprint(tok_dir):
  tok = open_tokenizer(tok_dir, expect={'input_fingerprint': 'x'})
  with open(os.path.join(tok_dir, 'spm.model'), 'rb') as f:
    assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
  manifest = artifacts.read_manifest(tok_dir, 'tokenizer')
  assert manifest['fingerprint'] == tok.fingerprint and manifest['vocab_size'] == 320
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (320, 0, 1, 2, 3)
  assert Tokenizer.load(os.path.join(tok_dir, 'spm.model')).fingerprint == tok.fingerprint
  with pytest.raises(artifacts.ArtifactError, match='input_fingerprint'):
    open_tokenizer(tok_dir, expect={'input_fingerprint': 'y'})


def test_training_is_deterministic(tok_dir, tmp_path):
  again = train_tokenizer(_docs(), _CFG, str(tmp_path / 't'), total_bytes=10**5)
  assert again.fingerprint == Tokenizer.load(tok_dir).fingerprint


def test_round_trip_is_lossless(tok_dir):
  tok = Tokenizer.load(tok_dir)
  texts = [d.text for d in _docs(20, seed=1)] + [
      '  leading and  double  spaces\n\nnewlines\ttabs ', 'unseen: ñ 😀 \x00 Ω', 'x']
  encoded = tok.encode(texts)
  assert all(ids.dtype == np.int32 and ids.size for ids in encoded)
  assert [tok.decode(ids) for ids in encoded] == texts
  assert all(tok.bos_id not in ids and tok.eos_id not in ids for ids in encoded)
  assert all(int(ids.max()) < tok.vocab_size for ids in encoded)


def test_unigram_trains(tmp_path):
  cfg = TokenizerConfig(vocab_size=300, model_type='unigram', train_chars=1_000_000)
  tok = train_tokenizer(_docs(), cfg, str(tmp_path / 't'), total_bytes=10**5)
  assert tok.vocab_size == 300 and tok.decode(tok.encode(['lazy dog'])[0]) == 'lazy dog'


def test_train_chars_samples_deterministically(tmp_path):
  cfg = TokenizerConfig(vocab_size=300, train_chars=4000)
  docs = _docs(2000)
  train_tokenizer(docs, cfg, str(tmp_path / 't'), total_bytes=sum(len(d.text) for d in docs))
  manifest = artifacts.read_manifest(str(tmp_path / 't'), 'tokenizer')
  assert 1000 < manifest['train_chars'] <= 4000
  # The sample spreads over the corpus instead of taking its head.
  assert manifest['train_documents'] < 0.5 * 2000


def test_too_large_vocab_is_a_clear_error(tmp_path):
  cfg = TokenizerConfig(vocab_size=20000)
  with pytest.raises(ValueError, match=r'lower --config.tokenizer.vocab_size to \d+ or less'):
    train_tokenizer(_docs(50), cfg, str(tmp_path / 't'), total_bytes=10**4)
  assert not os.path.exists(tmp_path / 't')


def test_too_small_vocab_says_to_raise_it(tmp_path):
  # 400 distinct characters (CJK) need more pieces than a 300 vocabulary holds:
  # sentencepiece's "smaller than required_chars" wants a LARGER vocab, never a smaller one.
  text = ''.join(chr(0x4E00 + i) for i in range(400))
  docs = [Document(text, f'd:{i}') for i in range(5)]
  with pytest.raises(ConfigError, match=r'RAISE --config.tokenizer.vocab_size to (\d+)') as e:
    train_tokenizer(docs, TokenizerConfig(vocab_size=300), str(tmp_path / 't'),
                    total_bytes=10**4)
  needed = int(re.search(r'vocab_size to (\d+)', str(e.value)).group(1))
  assert needed > 400  # The characters plus the special pieces.
  assert 'lower' not in str(e.value).split('RAISE')[1].lower()  # One fix, the right one.
  assert not os.path.exists(tmp_path / 't')


def _reference_split(text, max_bytes):
  """Plain-Python reference: greedy word packing (words here are short and ASCII)."""
  pieces, current = [], ''
  for word in text.split(' '):
    candidate = word if not current else current + ' ' + word
    if len(candidate.encode()) <= max_bytes:
      current = candidate
    else:
      pieces.append(current)
      current = word
  return pieces + [current]


def test_split_long_matches_reference_and_respects_utf8():
  rng = random.Random(3)
  text = ' '.join(rng.choice(['ab', 'cdef', 'g', 'hijklmn']) for _ in range(500))
  assert split_long(text, 40) == _reference_split(text, 40)
  pieces = split_long('ü' * 50, 7)  # No whitespace: cut at character boundaries.
  assert ''.join(pieces) == 'ü' * 50 and all(len(p.encode()) <= 7 for p in pieces)
  assert split_long('short', 100) == ['short']


def test_long_docs_policy(tmp_path):
  long_doc = Document(' '.join(['scaling'] * 400), 'big.txt:7')
  docs = _docs(200) + [long_doc]
  cfg = TokenizerConfig(vocab_size=300, max_sentence_length=1000, long_docs='error')
  with pytest.raises(CorpusError, match=r'big.txt:7: .*max_sentence_length.*long_docs=split'):
    train_tokenizer(docs, cfg, str(tmp_path / 'e'), total_bytes=10**5)
  cfg = TokenizerConfig(vocab_size=300, max_sentence_length=1000, long_docs='split')
  train_tokenizer(docs, cfg, str(tmp_path / 's'), total_bytes=10**5)
  assert artifacts.read_manifest(str(tmp_path / 's'), 'tokenizer')['long_docs_split'] == 1


def test_install_existing_model_checks_vocab(tok_dir, tmp_path):
  model = os.path.join(tok_dir, 'spm.model')
  tok = install_tokenizer(model, TokenizerConfig(vocab_size=320), str(tmp_path / 't'))
  assert tok.fingerprint == Tokenizer.load(tok_dir).fingerprint
  with pytest.raises(ValueError, match='set --config.tokenizer.vocab_size=320'):
    install_tokenizer(model, TokenizerConfig(vocab_size=4096), str(tmp_path / 'u'))
  bogus = tmp_path / 'bogus.model'
  bogus.write_bytes(b'not a model')
  with pytest.raises(artifacts.ArtifactError, match='not a valid sentencepiece model'):
    Tokenizer.load(str(bogus))


def test_shards_round_trip(tok_dir, tmp_path):
  tok = Tokenizer.load(tok_dir)
  docs = _docs(300, seed=5)
  p = tmp_path / 'c.txt'
  p.write_text('\n'.join(d.text.replace('\n', ' ') for d in docs) + '\n')
  corpus = FileCorpus([str(p)], 'lines')
  # A tiny batch size exercises the streaming path across many batches.
  shards = write_shards(str(tmp_path / 'sh'), corpus, tok, corpus.fingerprint,
                        batch_chars=500, name='train')
  texts = [d.text for d in corpus]
  expected = tok.encode(texts)
  assert shards.num_docs == len(texts) == len(shards)
  assert shards.num_tokens == sum(e.size for e in expected)
  assert shards.num_bytes == sum(len(t.encode()) for t in texts)
  assert shards.tokens.dtype == np.uint16 and shards.offsets.dtype == np.int64
  assert all(np.array_equal(a, b) for a, b in zip(shards, expected))
  assert tok.decode(shards.doc(3)) == texts[3]
  again = TokenShards.open(str(tmp_path / 'sh'), expect_tokenizer=tok.fingerprint)
  assert np.array_equal(again.offsets, shards.offsets)
  assert again.manifest['corpus_fingerprint'] == corpus.fingerprint
  assert token_dtype(65535) == np.uint16 and token_dtype(70000) == np.uint32


def test_shards_drop_empty_documents(tok_dir, tmp_path):
  tok = Tokenizer.load(tok_dir)
  docs = [Document('a dog', 'm:1'), Document('', 'm:2'), Document('fox', 'm:3')]
  shards = write_shards(str(tmp_path / 'sh'), docs, tok, 'fp')
  assert shards.num_docs == 2 and shards.manifest['dropped_empty'] == 1
  assert [tok.decode(d) for d in shards] == ['a dog', 'fox']


def test_shards_detect_wrong_tokenizer_truncation_and_corruption(tok_dir, tmp_path):
  tok = Tokenizer.load(tok_dir)
  directory = str(tmp_path / 'sh')
  write_shards(directory, _docs(50), tok, 'fp')
  with pytest.raises(artifacts.ArtifactError, match='tokenizer_fingerprint'):
    TokenShards.open(directory, expect_tokenizer='0' * 64)
  tokens_path = os.path.join(directory, 'tokens.bin')
  data = bytearray(open(tokens_path, 'rb').read())
  data[10] ^= 0xFF
  open(tokens_path, 'wb').write(bytes(data))
  with pytest.raises(artifacts.ArtifactError, match='sha256'):
    TokenShards.open(directory, expect_tokenizer=tok.fingerprint)
  TokenShards.open(directory, expect_tokenizer=tok.fingerprint, verify=False)  # Skips sha.
  open(tokens_path, 'wb').write(bytes(data[:-2]))
  with pytest.raises(artifacts.ArtifactError, match='truncated'):
    TokenShards.open(directory, verify=False)
  os.remove(os.path.join(directory, 'manifest.json'))
  with pytest.raises(artifacts.ArtifactError, match='incomplete'):
    TokenShards.open(directory)
