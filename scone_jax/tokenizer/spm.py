"""SentencePiece tokenizer: train from a corpus or load a .model; fingerprint = sha256 of it.

Trained models use the identity normaliser and keep whitespace as is, with "\\n" as its own
piece, so `decode(encode(text)) == text` for any text (byte_fallback covers every other
character): bits-per-byte and generated text then refer to the exact source bytes.
Special ids: pad=0, bos=1, eos=2, unk=3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

from scone_jax import artifacts, paths
from scone_jax.config import ConfigError, TokenizerConfig
from scone_jax.corpus import CorpusError, Document
from scone_jax.tokenizer import hf

MODEL_FILE = 'spm.model'
KIND = 'tokenizer'
# Bump when the training recipe changes, so cached tokenizers are retrained.
TRAIN_VERSION = 1
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
  """A loaded SentencePiece model (see ARCHITECTURE.md, "tokenizer")."""

  def __init__(self, model_proto: bytes, path: str = ''):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()
    self.vocab_size = self._sp.get_piece_size()
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError(f'sentencepiece model {path or "(in memory)"} has no BOS/EOS piece; '
                       'scone_jax prepends BOS to every document: train the model with '
                       'bos_id and eos_id set, or let prepare train one')
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.unk_id = self._sp.unk_id()
    # Padding positions are masked out (segment id 0, weight 0), so a model without a pad
    # piece can pad with id 0.
    self.pad_id = max(self._sp.pad_id(), 0)

  @classmethod
  def load(cls, dir_or_model_path: str) -> Tokenizer:
    """Loads `<dir>/spm.model` or a .model file."""
    path = dir_or_model_path
    if paths.isdir(path):
      path = paths.join(path, MODEL_FILE)
    if not paths.isfile(path):
      raise artifacts.ArtifactError(f'no sentencepiece model at {path}; run prepare or fix '
                                    'config.tokenizer.model_file')
    proto = paths.read_bytes(path)
    try:
      return cls(proto, path)
    except RuntimeError as e:  # sentencepiece's parse error.
      raise artifacts.ArtifactError(
          f'{path} is not a valid sentencepiece model ({e}); a Hugging Face tokenizer.json '
          'needs --config.tokenizer.kind=huggingface') from e

  def encode(self, texts: Sequence[str], num_threads: int = 2) -> list[np.ndarray]:
    """Token ids (int32, no BOS/EOS) of each text."""
    ids = self._sp.encode(list(texts), out_type=int, num_threads=num_threads)
    return [np.asarray(x, dtype=np.int32) for x in ids]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


@dataclasses.dataclass
class TrainStats:
  documents: int = 0
  chars: int = 0
  long_docs_split: int = 0
  first_long_doc: str = ''


def split_long(text: str, max_bytes: int) -> list[str]:
  """Splits text into pieces of at most max_bytes UTF-8 bytes, at whitespace when possible.

  The whitespace character at a cut is dropped; a run without whitespace is cut at a
  character boundary.
  """
  data = text.encode('utf-8')
  pieces = []
  while len(data) > max_bytes:
    window = data[:max_bytes + 1]
    cut = max(window.rfind(b' '), window.rfind(b'\n'), window.rfind(b'\t'))
    if cut > 0:
      pieces.append(data[:cut].decode('utf-8'))
      data = data[cut + 1:]
    else:
      cut = max_bytes
      while data[cut] & 0xC0 == 0x80:  # Back off UTF-8 continuation bytes.
        cut -= 1
      pieces.append(data[:cut].decode('utf-8'))
      data = data[cut:]
  if data:
    pieces.append(data.decode('utf-8'))
  return pieces


def _sampled(docs: Iterable[Document], cfg: TokenizerConfig, total_bytes: int,
             stats: TrainStats) -> Iterator[str]:
  """The training sentences: a deterministic sample of <= cfg.train_chars characters.

  Each document is kept when a hash of its source falls below train_chars / total_bytes,
  so the sample spreads over the whole corpus rather than taking its head.
  """
  keep = min(1.0, cfg.train_chars / max(total_bytes, 1))
  for doc in docs:
    u = int(hashlib.sha256(doc.source.encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u >= keep:
      continue
    if stats.chars + len(doc.text) > cfg.train_chars:
      return
    stats.documents += 1
    stats.chars += len(doc.text)
    if len(doc.text.encode('utf-8')) <= cfg.max_sentence_length:
      yield doc.text
      continue
    if cfg.long_docs == 'error':
      raise CorpusError(
          f'{doc.source}: document of {len(doc.text.encode("utf-8"))} bytes is longer than '
          f'tokenizer.max_sentence_length={cfg.max_sentence_length}; raise '
          '--config.tokenizer.max_sentence_length or set --config.tokenizer.long_docs=split')
    stats.long_docs_split += 1
    stats.first_long_doc = stats.first_long_doc or doc.source
    yield from split_long(doc.text, cfg.max_sentence_length)


def train_tokenizer(docs: Iterable[Document], cfg: TokenizerConfig, directory: str,
                    total_bytes: int, meta: dict | None = None) -> Tokenizer:
  """Trains a SentencePiece model on a sample of `docs`; writes <directory>/spm.model.

  Args:
    docs: the train corpus (re-iterable or not: it is read once).
    cfg: the tokenizer config section.
    directory: the artifact directory (A/tokenizer), written atomically.
    total_bytes: an upper bound on the corpus's text bytes, for the sampling rate.
    meta: extra manifest fields (prepare records its input fingerprint here).
  """
  stats = TrainStats()
  model = io.BytesIO()
  failures = []

  def sentences():
    # sentencepiece turns an exception raised by the iterator into a RuntimeError; keep
    # the original (a CorpusError naming file:line) to re-raise it.
    try:
      yield from _sampled(docs, cfg, total_bytes, stats)
    except Exception as e:
      failures.append(e)
      raise

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model,
        vocab_size=cfg.vocab_size, model_type=cfg.model_type, byte_fallback=True,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        max_sentence_length=cfg.max_sentence_length, normalization_rule_name='identity',
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=['\n'], character_coverage=1.0, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    if failures:
      raise failures[0] from None
    raise ConfigError(
        f'sentencepiece could not train a {cfg.model_type} vocabulary of '
        f'{cfg.vocab_size} on {stats.documents} documents ({stats.chars} characters): {e}. '
        f'{_vocab_fix(str(e))}') from e
  if stats.long_docs_split:
    logging.warning('tokenizer training: split %d document(s) longer than '
                    'tokenizer.max_sentence_length=%d bytes at whitespace (first: %s)',
                    stats.long_docs_split, cfg.max_sentence_length, stats.first_long_doc)
  tok = Tokenizer(model.getvalue())
  _write(directory, model.getvalue(), {
      'source': 'trained', 'model_type': cfg.model_type, 'train_documents': stats.documents,
      'train_chars': stats.chars, 'long_docs_split': stats.long_docs_split,
      **(meta or {})})
  logging.info('trained a %s tokenizer, vocab %d, on %d documents (%d chars)',
               cfg.model_type, tok.vocab_size, stats.documents, stats.chars)
  return Tokenizer.load(directory)


_TOO_SMALL_RE = re.compile(r'smaller than required_chars\. (\d+) vs (\d+)')
_TOO_HIGH_RE = re.compile(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)')


def _vocab_fix(message: str) -> str:
  """The fix for sentencepiece's training error `message`, read from the message itself.

  "smaller than required_chars. V vs N": the corpus has more distinct characters (plus
  the special pieces) than the vocabulary holds, so the vocabulary must GROW to N.
  "too high ... <= N": the sample is too small to yield V pieces, so it must shrink.
  """
  small = _TOO_SMALL_RE.search(message)
  if small:
    return (f'The corpus needs at least {small.group(2)} pieces for its distinct characters '
            f'and the special pieces: RAISE --config.tokenizer.vocab_size to '
            f'{small.group(2)} or more')
  high = _TOO_HIGH_RE.search(message)
  if high:
    return (f'The sampled corpus yields at most {high.group(1)} pieces: lower '
            f'--config.tokenizer.vocab_size to {high.group(1)} or less, or use a larger '
            'corpus (or a larger --config.tokenizer.train_chars)')
  return ('Check the vocabulary size against the corpus: lower '
          '--config.tokenizer.vocab_size for a small corpus, raise it for one with many '
          'distinct characters')


def install_tokenizer(model_file: str, cfg: TokenizerConfig, directory: str,
                      meta: dict | None = None) -> Tokenizer:
  """Copies an existing model into the artifact directory after checking its vocab size.

  A config vocab_size that differs from the model's is an error rather than a silent
  override: the model size feeds the embedding and output layer shapes.
  tokenizer.kind='huggingface' installs a tokenizer.json instead (scone_jax/tokenizer/hf.py).
  """
  if cfg.kind == 'huggingface':
    return hf.install(model_file, cfg, directory, KIND, meta or {})
  tok = Tokenizer.load(model_file)
  if tok.vocab_size != cfg.vocab_size:
    raise ConfigError(
        f'tokenizer.model_file={model_file} has vocab_size {tok.vocab_size} but '
        f'config.tokenizer.vocab_size={cfg.vocab_size}; set '
        f'--config.tokenizer.vocab_size={tok.vocab_size}')
  _write(directory, paths.read_bytes(tok.path),
         {'source': paths.resolve(model_file), **(meta or {})})
  return Tokenizer.load(directory)


def _write(directory: str, model_proto: bytes, meta: dict) -> None:
  tok = Tokenizer(model_proto)
  with artifacts.atomic_dir(directory) as tmp:
    with open(os.path.join(tmp, MODEL_FILE), 'wb') as f:
      f.write(model_proto)
    artifacts.write_manifest(tmp, KIND, {'fingerprint': tok.fingerprint,
                                         'vocab_size': tok.vocab_size, **meta})


def open_tokenizer(directory: str, expect: dict | None = None) -> Tokenizer:
  """Loads A/tokenizer after checking its manifest (and that the model matches it)."""
  manifest = artifacts.read_manifest(directory, KIND, verify=True, expect=expect)
  if manifest.get('tokenizer_kind') == 'huggingface':
    return hf.open_dir(directory, manifest)
  tok = Tokenizer.load(directory)
  if tok.fingerprint != manifest.get('fingerprint'):
    raise artifacts.ArtifactError(f'{directory}: spm.model does not match its manifest '
                                  'fingerprint; rebuild the tokenizer')
  return tok

