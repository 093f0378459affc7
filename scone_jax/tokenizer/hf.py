"""Hugging Face tokenizers: a local `tokenizer.json` (GPT-2, GPT-NeoX-20B) through `tokenizers`.

No network: the file is read from disk (`tokenizer.model_file`); nothing is downloaded.
The fingerprint is the sha256 of the file's bytes, as for sentencepiece models, and the
vocab size is the largest id + 1 (added tokens included), so every id the tokenizer can
emit has a row in the embedding table.

Special tokens. scone_jax prepends BOS to every document, stops generation at EOS and pads
with pad (padded positions are masked, so pad never reaches a loss). tokenizer.json files
rarely say which token plays which role, so the roles are resolved here, explicitly:
  * `tokenizer.eos_token`, `bos_token`, `pad_token` when set (each must be in the vocab);
  * else EOS is the first of <|endoftext|>, </s>, <eos>, <|end_of_text|> present;
  * BOS is the first of <s>, <bos>, <|begin_of_text|>, <|startoftext|>, else EOS. GPT-2 and
    GPT-NeoX-20B have only <|endoftext|>: both were trained on documents joined by it, so
    it marks a document start as well as an end, and we use it for both roles;
  * pad is the first of <pad>, <|padding|> (GPT-NeoX-20B's id 1), else EOS.
The resolved strings and ids are recorded in the tokenizer artifact's manifest. Encoding
never adds the tokenizer's own template specials (add_special_tokens=False): BOS is added
once, by the packer. Special-token strings that occur in a document's text (a web page
quoting "<|endoftext|>") are encoded as ordinary text (encode_special_tokens), so the BOS/EOS
ids never occur inside a document and no f-gram contains them, as with sentencepiece.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np
import tokenizers

from scone_jax import artifacts, paths
from scone_jax.config import ConfigError, TokenizerConfig

FILE = 'tokenizer.json'
KIND_NAME = 'huggingface'
EOS_CANDIDATES = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>')
BOS_CANDIDATES = ('<s>', '<bos>', '<|begin_of_text|>', '<|startoftext|>')
PAD_CANDIDATES = ('<pad>', '<|padding|>')


class HFTokenizer:
  """A loaded tokenizer.json with the interface of `spm.Tokenizer`."""

  kind = KIND_NAME

  def __init__(self, data: bytes, path: str = '', bos_token: str = '', eos_token: str = '',
               pad_token: str = ''):
    where = path or '(in memory)'
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
    except Exception as e:  # tokenizers raises plain Exceptions on a bad file.
      raise artifacts.ArtifactError(f'{where} is not a valid tokenizer.json ({e}); give '
                                    'config.tokenizer.model_file a Hugging Face '
                                    'tokenizer.json') from e
    self._tok.encode_special_tokens = True  # See the module docstring.
    self.path = path
    self.fingerprint = hashlib.sha256(data).hexdigest()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    eos = self._role(vocab, 'eos_token', eos_token, EOS_CANDIDATES, None, where)
    self.eos_token = eos
    self.bos_token = self._role(vocab, 'bos_token', bos_token, BOS_CANDIDATES, eos, where)
    self.pad_token = self._role(vocab, 'pad_token', pad_token, PAD_CANDIDATES, eos, where)
    self.eos_id, self.bos_id, self.pad_id = (vocab[self.eos_token], vocab[self.bos_token],
                                             vocab[self.pad_token])
    self.unk_id = vocab.get('<unk>', -1)  # Byte-level BPE has no unknown token.

  @staticmethod
  def _role(vocab: dict[str, int], key: str, given: str, candidates: Sequence[str],
            default: str | None, where: str) -> str:
    if given:
      if given not in vocab:
        raise ConfigError(f'config.tokenizer.{key}={given!r} is not a token of {where}; '
                          'give a token the file defines, or leave it empty for the default')
      return given
    for token in candidates:
      if token in vocab:
        return token
    if default is None:
      raise ConfigError(f'{where} has none of {list(candidates)}; name its end-of-document '
                        f'token with --config.tokenizer.{key}=<token>')
    return default

  @classmethod
  def load(cls, dir_or_path: str, bos_token: str = '', eos_token: str = '',
           pad_token: str = '') -> HFTokenizer:
    """Loads `<dir>/tokenizer.json` or a tokenizer.json file."""
    path = dir_or_path
    if paths.isdir(path):  # Local or a bucket: a run reopens from either.
      path = paths.join(path, FILE)
    if not paths.isfile(path):
      raise artifacts.ArtifactError(f'no tokenizer.json at {path}; fix '
                                    'config.tokenizer.model_file')
    return cls(paths.read_bytes(path), path, bos_token, eos_token, pad_token)

  def encode(self, texts: Sequence[str], num_threads: int = 2) -> list[np.ndarray]:
    """Token ids (int32, no BOS/EOS) of each text."""
    del num_threads  # tokenizers parallelises batches itself (RAYON_NUM_THREADS).
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) or ''

  def specials(self) -> dict[str, object]:
    """Resolved roles for the manifest."""
    return {'bos_token': self.bos_token, 'eos_token': self.eos_token,
            'pad_token': self.pad_token, 'bos_id': self.bos_id, 'eos_id': self.eos_id,
            'pad_id': self.pad_id}


def install(model_file: str, cfg: TokenizerConfig, directory: str, kind: str, meta: dict) -> HFTokenizer:
  """Copies a tokenizer.json into the artifact directory after checking its vocab size.

  Args:
    model_file: the tokenizer.json.
    cfg: the TokenizerConfig (vocab_size and the special-token overrides).
    directory: A/tokenizer, written atomically.
    kind: the manifest kind of tokenizer artifacts.
    meta: extra manifest fields.
  """
  tok = HFTokenizer.load(model_file, cfg.bos_token, cfg.eos_token, cfg.pad_token)
  if tok.vocab_size != cfg.vocab_size:
    raise ConfigError(
        f'tokenizer.model_file={model_file} has vocab_size {tok.vocab_size} (largest id + 1, '
        f'added tokens included) but config.tokenizer.vocab_size={cfg.vocab_size}; set '
        f'--config.tokenizer.vocab_size={tok.vocab_size}')
  data = paths.read_bytes(tok.path)
  with artifacts.atomic_dir(directory) as tmp:
    with open(os.path.join(tmp, FILE), 'wb') as f:
      f.write(data)
    artifacts.write_manifest(tmp, kind, {
        'fingerprint': tok.fingerprint, 'vocab_size': tok.vocab_size,
        'tokenizer_kind': KIND_NAME, 'source': paths.resolve(model_file),
        **tok.specials(), **meta})
  return open_dir(directory, artifacts.read_manifest(directory, kind, verify=False))


def open_dir(directory: str, manifest: dict) -> HFTokenizer:
  """Loads A/tokenizer with the special tokens its manifest recorded."""
  tok = HFTokenizer.load(directory, manifest.get('bos_token', ''),
                         manifest.get('eos_token', ''), manifest.get('pad_token', ''))
  if tok.fingerprint != manifest.get('fingerprint'):
    raise artifacts.ArtifactError(f'{directory}: {FILE} does not match its manifest '
                                  'fingerprint; rebuild the tokenizer')
  return tok
