"""Token shards: a corpus tokenized once into a flat memory-mapped array plus offsets.

Layout of a shards directory (see ARCHITECTURE.md):
  tokens.bin    flat token ids, uint16 when vocab_size < 2**16 else uint32 (D docs, N tokens)
  offsets.npy   int64 [D+1]; document i is tokens[offsets[i]:offsets[i+1]]
  loss_mask.bin uint8 [N], parallel to tokens.bin, only for supervised fine-tuning corpora
                (data.format 'sft' / 'chat', corpus/sft.py): 1 = a response token the
                loss covers, 0 = prompt / template. Listed (and checksummed) in the
                manifest like the tokens (`loss_mask`: its file name; its sha256 joins
                the fingerprint); shards without it read as all ones.
  manifest.json tokenizer_fingerprint, corpus_fingerprint, num_docs, num_tokens,
                num_bytes (UTF-8 bytes of the source text, for bits per byte), dtype,
                max_token_id (checked against the vocabulary on open, so no batch can
                carry an id past the embedding table)
Documents are stored without BOS/EOS; documents that encode to no token are dropped.
Local shards are memory-mapped; shards in an object store are read by byte range through
a per-process block cache (`paths.RangeArray`): a host reads only the documents it uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import tqdm
from absl import logging

from scone_jax import artifacts, paths
from scone_jax.corpus import Document
from scone_jax.tokenizer.spm import Tokenizer

KIND = 'token_shards'
TOKENS_FILE = 'tokens.bin'
OFFSETS_FILE = 'offsets.npy'
LOSS_MASK_FILE = 'loss_mask.bin'


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size < (1 << 16) else np.uint32)


class TokenShards:
  """A memory-mapped shards directory: `tokens` (1-D), `offsets` (int64 [D+1])."""

  def __init__(self, directory: str, manifest: dict, tokens: np.ndarray,
               offsets: np.ndarray, loss_mask: np.ndarray | None = None):
    self.directory = directory
    self.manifest = manifest
    self.tokens = tokens
    self.offsets = offsets
    # uint8 [N] parallel to tokens (1 = in the loss), or None = every token (all ones).
    self.loss_mask = loss_mask

  @classmethod
  def open(cls, directory: str, expect_tokenizer: str | None = None,
           verify: bool = True, expect: dict | None = None,
           vocab_size: int | None = None) -> TokenShards:
    """Opens and checks shards; raises ArtifactError saying what is wrong.

    Args:
      directory: the shards directory.
      expect_tokenizer: the tokenizer fingerprint the shards must have been built with.
      verify: recompute the files' sha256 (sizes are always checked).
      expect: further manifest fields that must match (e.g. corpus_fingerprint).
      vocab_size: every token id must be below it (see `check_vocab`).
    """
    expect = dict(expect or {})
    if expect_tokenizer is not None:
      expect['tokenizer_fingerprint'] = expect_tokenizer
    manifest = artifacts.read_manifest(directory, KIND, verify=verify, expect=expect)
    dtype = np.dtype(manifest['dtype'])
    num_tokens, num_docs = manifest['num_tokens'], manifest['num_docs']
    tokens_path = paths.join(directory, TOKENS_FILE)
    size = paths.getsize(tokens_path)
    if size != num_tokens * dtype.itemsize:
      raise artifacts.ArtifactError(
          f'{tokens_path} has {size} bytes, expected {num_tokens} '
          f'{dtype} tokens: truncated or modified; rebuild the token shards')
    offsets_path = paths.join(directory, OFFSETS_FILE)
    if paths.is_remote(directory):
      tokens = paths.RangeArray(tokens_path, dtype, num_tokens)
      offsets = np.load(io.BytesIO(paths.read_bytes(offsets_path)), allow_pickle=False)
    else:
      tokens = np.memmap(tokens_path, dtype=dtype, mode='r', shape=(num_tokens,))
      offsets = np.load(offsets_path, allow_pickle=False)
    if (offsets.dtype != np.int64 or offsets.shape != (num_docs + 1,) or offsets[0] != 0 or
        offsets[-1] != num_tokens or np.any(np.diff(offsets) <= 0)):
      raise artifacts.ArtifactError(
          f'{directory}/{OFFSETS_FILE} is inconsistent with the manifest ({num_docs} '
          f'documents, {num_tokens} tokens); rebuild the token shards')
    loss_mask = None
    if manifest.get('loss_mask'):
      mask_path = paths.join(directory, manifest['loss_mask'])
      if paths.getsize(mask_path) != num_tokens:
        raise artifacts.ArtifactError(
            f'{mask_path} has {paths.getsize(mask_path)} bytes, expected one per token '
            f'({num_tokens}): truncated or modified; rebuild the token shards')
      loss_mask = (paths.RangeArray(mask_path, np.dtype(np.uint8), num_tokens)
                   if paths.is_remote(directory) else
                   np.memmap(mask_path, dtype=np.uint8, mode='r', shape=(num_tokens,)))
    shards = cls(directory, manifest, tokens, offsets, loss_mask)
    if vocab_size is not None:
      shards.check_vocab(vocab_size)
    return shards

  def max_token_id(self, chunk: int = 1 << 24) -> int:
    """The largest token id: from the manifest, or (shards written before it recorded
    one) one chunked pass over the memory-mapped tokens."""
    if 'max_token_id' in self.manifest:
      return int(self.manifest['max_token_id'])
    logging.info('token shards %s record no max_token_id: scanning %d tokens',
                 self.directory, self.num_tokens)
    return max((int(self.tokens[i:i + chunk].max())
                for i in range(0, self.num_tokens, chunk)), default=-1)

  def check_vocab(self, vocab_size: int) -> None:
    """Raises ArtifactError if a token id is >= vocab_size: it would index past the
    embedding table (JAX clamps or fills out-of-range gathers silently)."""
    top = self.max_token_id()
    if top >= vocab_size:
      raise artifacts.ArtifactError(
          f'token shards {self.directory} hold token id {top}, but the vocabulary has '
          f'{vocab_size} ids (0..{vocab_size - 1}): they were built with another tokenizer '
          'or are corrupt; rebuild them with the run\'s tokenizer (delete the directory and '
          'rerun prepare)')

  @property
  def num_docs(self) -> int:
    return self.manifest['num_docs']

  @property
  def num_tokens(self) -> int:
    return self.manifest['num_tokens']

  @property
  def num_bytes(self) -> int:
    return self.manifest['num_bytes']

  @property
  def fingerprint(self) -> str:
    """Identifies the shards' content (tokenizer, corpus and tokens checksum)."""
    return self.manifest['fingerprint']

  def doc(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def __len__(self) -> int:
    return self.num_docs

  def __iter__(self) -> Iterator[np.ndarray]:
    for i in range(self.num_docs):
      yield self.doc(i)


def write_shards(directory: str, docs: Iterable[Document], tokenizer: Tokenizer,
                 corpus_fingerprint: str, total_bytes: int | None = None,
                 batch_chars: int = 1 << 22, name: str = '',
                 extra_meta: Callable[[], dict] | None = None,
                 loss_mask: bool = False) -> TokenShards:
  """Tokenizes `docs` into a shards directory, streaming batches of ~batch_chars chars.

  Args:
    directory: the shards directory, written atomically.
    docs: the corpus, read once.
    tokenizer: encodes the documents (sentencepiece, 2 threads).
    corpus_fingerprint: recorded in the manifest; prepare compares it to skip rebuilds.
    total_bytes: the input's size, for the progress bar (None = unknown).
    batch_chars: characters per encode batch; bounds memory.
    name: the split's name, for the progress bar and log.
    extra_meta: called after the pass for more manifest fields (e.g. the reader's
      invalid-UTF-8 counts, known only once the corpus has been read).
    loss_mask: also write loss_mask.bin from the documents' `spans` (each span encoded
      on its own; a document without spans is all ones).
  """
  dtype = token_dtype(tokenizer.vocab_size)
  counts = dict(num_docs=0, num_tokens=0, num_bytes=0, num_chars=0, dropped_empty=0,
                max_token_id=-1)
  tokens_sha, mask_sha = hashlib.sha256(), hashlib.sha256()
  start = time.perf_counter()
  with artifacts.atomic_dir(directory) as tmp:
    raw_offsets_path = os.path.join(tmp, 'offsets.raw')
    with open(os.path.join(tmp, TOKENS_FILE), 'wb') as tokens_f, \
        open(raw_offsets_path, 'wb') as offsets_f, \
        (open(os.path.join(tmp, LOSS_MASK_FILE), 'wb') if loss_mask
         else contextlib.nullcontext()) as mask_f, \
        tqdm.tqdm(total=total_bytes, unit='B', unit_scale=True, mininterval=2.0,
                  desc=f'tokenize {name}'.strip()) as bar:

      def flush(texts: list[str]) -> None:
        pieces = iter(tokenizer.encode([t for doc in texts for t, _ in _spans(doc)]))
        encoded, masks = [], []
        for doc in texts:
          spans = _spans(doc)
          ids = [next(pieces) for _ in spans]
          if sum(x.size for x in ids):
            encoded.append(np.concatenate(ids))
            masks.append(np.concatenate([np.full(x.size, trained, np.uint8)
                                         for x, (_, trained) in zip(ids, spans)]))
        counts['dropped_empty'] += len(texts) - len(encoded)
        append(encoded, masks)

      def append(encoded: list[np.ndarray], masks: list[np.ndarray] | None = None) -> None:
        if encoded:
          lengths = np.fromiter((ids.size for ids in encoded), np.int64, len(encoded))
          ends = counts['num_tokens'] + np.cumsum(lengths)
          ids = np.concatenate(encoded)
          counts['max_token_id'] = max(counts['max_token_id'], int(ids.max()))
          block = ids.astype(dtype).tobytes()
          tokens_f.write(block)
          tokens_sha.update(block)
          if mask_f is not None:
            mask = np.concatenate(masks) if masks else np.ones(ids.size, np.uint8)
            counts['num_loss_tokens'] = counts.get('num_loss_tokens', 0) + int(mask.sum())
            mask_f.write(mask.tobytes())
            mask_sha.update(mask.tobytes())
          offsets_f.write(ends.tobytes())
          counts['num_docs'] += len(encoded)
          counts['num_tokens'] = int(ends[-1])

      batch: list = []
      batch_ids: list[np.ndarray] = []
      batch_len = 0
      for doc in docs:
        if doc.ids is not None:  # Already tokenized (data.format='arrayrecord_tokens').
          batch_len += _add_pretokenized(doc, tokenizer, batch_ids, counts)
          bar.update(doc.ids.nbytes)
          if batch_len >= batch_chars:
            append(batch_ids)
            batch_ids, batch_len = [], 0
          continue
        batch.append(doc if loss_mask and doc.spans is not None else doc.text)
        batch_len += len(doc.text)
        doc_bytes = len(doc.text.encode('utf-8'))
        counts['num_bytes'] += doc_bytes
        counts['num_chars'] += len(doc.text)
        bar.update(doc_bytes)
        if batch_len >= batch_chars:
          flush(batch)
          batch, batch_len = [], 0
      flush(batch)
      append(batch_ids)
    if not counts['num_docs']:
      raise ValueError(f'token shards {name!r}: no document produced any token; check the '
                       'corpus')
    _write_offsets(os.path.join(tmp, OFFSETS_FILE), raw_offsets_path, counts['num_docs'])
    seconds = time.perf_counter() - start
    # The mask joins the fingerprint only when written: other shards keep theirs.
    mask_meta = {'loss_mask': LOSS_MASK_FILE} if loss_mask else {}
    artifacts.write_manifest(tmp, KIND, {
        **counts, 'dtype': dtype.name, 'tokenizer_fingerprint': tokenizer.fingerprint,
        'corpus_fingerprint': corpus_fingerprint, 'vocab_size': tokenizer.vocab_size,
        **mask_meta,
        'fingerprint': artifacts.fingerprint(tokenizer.fingerprint, corpus_fingerprint,
                                             tokens_sha.hexdigest(),
                                             *([mask_sha.hexdigest()] if loss_mask else [])),
        'seconds': round(seconds, 3), **(extra_meta() if extra_meta else {})})
  logging.info('token shards %s: %d docs, %d tokens (%.0f tokens/s), %d empty dropped',
               name, counts['num_docs'], counts['num_tokens'],
               counts['num_tokens'] / max(seconds, 1e-9), counts['dropped_empty'])
  return TokenShards.open(directory, expect_tokenizer=tokenizer.fingerprint, verify=False,
                         vocab_size=tokenizer.vocab_size)


def _spans(doc) -> tuple[tuple[str, bool], ...]:
  """A queued document's (text, trained) pieces: its spans, or its text, trained."""
  return doc.spans if isinstance(doc, Document) else ((doc, True),)


def _add_pretokenized(doc: Document, tokenizer: Tokenizer, batch_ids: list[np.ndarray],
                      counts: dict[str, int]) -> int:
  """Queues an already tokenized document; returns its length in characters.

  Its ids are checked against the vocabulary (an id past it would embed garbage), and it is
  decoded once so that bytes and characters (bits per byte) count its text like any other.
  """
  ids = doc.ids
  if ids.size and int(ids.max()) >= tokenizer.vocab_size:
    raise ValueError(f'{doc.source}: token id {int(ids.max())} is >= the tokenizer\'s vocab '
                     f'size {tokenizer.vocab_size}; the ids were made by another tokenizer '
                     'than config.tokenizer.model_file')
  text = tokenizer.decode(ids)
  counts['num_bytes'] += len(text.encode('utf-8'))
  counts['num_chars'] += len(text)
  if ids.size:
    batch_ids.append(ids.astype(np.int32))
  else:
    counts['dropped_empty'] += 1
  return len(text)


def _write_offsets(path: str, raw_path: str, num_docs: int, chunk: int = 1 << 22) -> None:
  """Writes offsets.npy ([0] + the streamed document ends) without holding them in RAM."""
  out = np.lib.format.open_memmap(path, mode='w+', dtype=np.int64, shape=(num_docs + 1,))
  out[0] = 0
  ends = np.memmap(raw_path, dtype=np.int64, mode='r', shape=(num_docs,))
  for i in range(0, num_docs, chunk):
    out[1 + i:1 + i + chunk] = ends[i:i + chunk]
  out.flush()
  del out, ends
  os.remove(raw_path)
