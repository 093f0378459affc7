"""The prepare stage: corpus -> tokenizer -> token shards -> f-gram table.

  python -m scone_jax.prepare --config=experiments/tiny.py --workdir=runs/tiny

Artifacts go to A = cfg.data.artifacts_dir or <workdir>/prepare (layout in ARCHITECTURE.md).
Each stage records the fingerprint of its inputs in its manifest and is skipped when a
rerun finds the same one, so sweep points sharing A prepare once; a changed upstream
artifact (e.g. another tokenizer) changes every downstream input fingerprint and forces a
rebuild. `load_prepared` opens the artifacts for train/evaluate without building anything.

A workdir that holds a run (W/run.json) is never prepared again: its recorded artifacts are
reopened and checked against this config's inputs, and a changed corpus, tokenizer or
table input is a `RunInputsChangedError` before anything is written (a resume must not
continue under other token ids). A table mined shorter than the S the config asks for is
a `ShortTableError` unless fgram.allow_short_table.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np
from absl import flags, logging

from scone_jax import artifacts, cli, paths
from scone_jax import config as config_lib
from scone_jax import config_runtime
from scone_jax import run as run_lib
from scone_jax.config import Config
from scone_jax.errors import UserError
from scone_jax.corpus import CorpusError, FileCorpus, embedded, readers, sft
from scone_jax.fgrams import FgramTable, mine_fgrams
from scone_jax.hf import load as hf_load
from scone_jax.tokenizer import (TokenShards, Tokenizer, install_tokenizer, open_tokenizer,
                                 train_tokenizer, write_shards)
from scone_jax.tokenizer import spm as spm_lib

EMBEDDED_EVAL_NAME = 'stdlib'
# Bump when a stage's recipe changes in a way its other inputs do not capture.
PREPARE_VERSION = 1


class RunInputsChangedError(UserError, RuntimeError):
  """The run in the workdir was trained on other inputs than this config names."""


class ShortTableError(UserError, ValueError):
  """The mined f-gram table has fewer rows than the S the config asks for."""


FLAGS = flags.FlagValues()
_CONFIG = cli.define_config_file(FLAGS)
_WORKDIR = cli.define_workdir(FLAGS)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """The prepared artifacts (directories absolute) and their opened forms."""
  artifacts_dir: str
  train_dir: str
  eval_dirs: dict[str, str]  # eval corpus name -> token shards directory
  fgram_dir: str
  tokenizer_fingerprint: str
  train_fingerprint: str  # TokenShards.fingerprint of the train split
  fgram_fingerprint: str  # FgramTable.fingerprint
  tokenizer: Tokenizer = dataclasses.field(repr=False)
  train_shards: TokenShards = dataclasses.field(repr=False)
  eval_shards: dict[str, TokenShards] = dataclasses.field(repr=False)
  table: FgramTable = dataclasses.field(repr=False)  # Rows in rank order, all S of them.
  # Filled by `prepare`: seconds per stage, and the stages reused from an earlier run.
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  skipped: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Corpora:
  train: FileCorpus
  evals: dict[str, FileCorpus]


def artifacts_dir(cfg: Config, workdir: str) -> str:
  return paths.resolve(cfg.data.artifacts_dir or paths.join(workdir, 'prepare'))


def _corpora(cfg: Config, art_dir: str, build: bool) -> _Corpora:
  data = cfg.data
  if data.source == 'embedded':
    corpus_dir = os.path.join(art_dir, 'corpus')
    opener = embedded.build_embedded if build else embedded.open_embedded
    emb = opener(corpus_dir, data.embedded_eval_fraction,
                 valid_fraction=data.embedded_valid_fraction)
    evals = {EMBEDDED_EVAL_NAME: emb.split('eval')}
    if data.embedded_valid_fraction:
      valid_name = config_lib.VALID_PREFIX + EMBEDDED_EVAL_NAME
      evals[valid_name] = emb.split('valid')
    return _Corpora(emb.split('train'), evals)
  if not data.train_files:
    raise CorpusError("prepare needs config.data.train_files (comma-separated globs) when "
                      "config.data.source='files', e.g. --config.data.train_files='/d/*.txt'")
  if not data.eval_files and not data.allow_no_eval:
    raise CorpusError("config.data.eval_files is empty: a run on data.source='files' needs a "
                      "held-out test set, e.g. --config.data.eval_files='heldout=/d/test.txt'"
                      ' (files not in data.train_files); to train without one, set '
                      '--config.data.allow_no_eval=True')
  template = sft.chat_template(cfg.tokenizer.model_file) if data.format == 'chat' else ''
  train = readers.files_corpus(data.train_files, 'data.train_files', data.format,
                               data.text_field, data.on_bad_utf8, 'train', data.check_format,
                               template)
  evals = {name: FileCorpus(paths, data.format, data.text_field, data.on_bad_utf8, name,
                            check_format=data.check_format, chat_template=template)
           for name, paths in readers.parse_named_globs(data.eval_files).items()}
  if 'train' in evals:  # Stage names and Prepared keys reserve it for the train split.
    raise CorpusError("config.data.eval_files: an eval corpus cannot be named 'train'; name "
                      'it explicitly, e.g. "heldout=/d/train.txt"')
  evals.update(_valid_corpora(data, evals))
  _check_held_out(train, evals)
  return _Corpora(train, evals)


def _same_file(path: str) -> str:
  """What identifies a file across spellings: its realpath (URLs as given)."""
  return path if paths.is_remote(path) else os.path.realpath(path)


def _check_held_out(train: FileCorpus, evals: dict[str, FileCorpus]) -> None:
  """No eval or validation corpus may share a file with the train corpus: its loss would
  not be held out (test leakage), whatever the spelling (globs, symlinks, ./)."""
  train_files = {_same_file(p): p for p in train.paths}
  for name, corpus in evals.items():
    for p in corpus.paths:
      if _same_file(p) in train_files:
        key = 'data.valid_files' if config_lib.is_validation_corpus(name) else 'data.eval_files'
        raise CorpusError(f'{key}: corpus {name!r} file {p} is also a training file '
                          f'({train_files[_same_file(p)]} in data.train_files): its loss '
                          'would not be held out; remove it from one of the two')


def _valid_corpora(data: config_lib.DataConfig,
                   tests: dict[str, FileCorpus]) -> dict[str, FileCorpus]:
  """data.valid_files as eval corpora named 'valid.<name>', disjoint from the test sets."""
  for name in tests:
    if config_lib.is_validation_corpus(name):
      raise CorpusError(f'config.data.eval_files: {name!r} starts with '
                        f'{config_lib.VALID_PREFIX!r}, reserved for validation sets; put '
                        'validation corpora in config.data.valid_files')
  test_files = {os.path.abspath(p): n for n, c in tests.items() for p in c.paths}
  valid = {}
  for name, paths in readers.parse_named_globs(data.valid_files, 'data.valid_files').items():
    shared = sorted(p for p in paths if os.path.abspath(p) in test_files)
    if shared:
      raise CorpusError(f'config.data.valid_files: {shared[0]} is also in test corpus '
                        f'{test_files[os.path.abspath(shared[0])]!r} of data.eval_files; '
                        'validation and test sets must not share files')
    full = config_lib.VALID_PREFIX + name
    valid[full] = FileCorpus(paths, data.format, data.text_field, data.on_bad_utf8, full,
                             check_format=data.check_format)
  return valid


def _tokenizer_input(cfg: Config, train: FileCorpus) -> str:
  tc = cfg.tokenizer
  if tc.model_file:
    if not paths.isfile(tc.model_file):
      raise artifacts.ArtifactError(f'config.tokenizer.model_file={tc.model_file} does not '
                                    'exist; fix the path or leave it empty to train one')
    if tc.kind == 'huggingface':  # The special-token roles change what BOS/EOS are.
      return artifacts.fingerprint('model_file', artifacts.sha256_file(tc.model_file),
                                   tc.vocab_size, tc.kind, tc.bos_token, tc.eos_token,
                                   tc.pad_token)
    return artifacts.fingerprint('model_file', artifacts.sha256_file(tc.model_file),
                                 tc.vocab_size)
  return artifacts.fingerprint('train', spm_lib.TRAIN_VERSION, train.fingerprint,
                               dataclasses.asdict(tc))


def _fgram_input(cfg: Config, tokenizer_fp: str, train_fp: str) -> str:
  # The miner is left out: 'local' and 'beam' produce the same table exactly, and
  # memory_budget_mb only changes how it is computed.
  fc = cfg.fgram
  if fc.table_dir:  # A given table: its own content, not the train split, defines it.
    return artifacts.fingerprint('given_fgrams', tokenizer_fp, _given_table(cfg).fingerprint)
  return artifacts.fingerprint('fgrams', PREPARE_VERSION, tokenizer_fp, train_fp,
                               fc.max_len, fc.size, fc.min_count)


def _given_table(cfg: Config, tokenizer_fp: str | None = None) -> FgramTable:
  """The table of fgram.table_dir, checked against this run's tokenizer and K."""
  where = f'config.fgram.table_dir={cfg.fgram.table_dir}'
  try:
    table = FgramTable.load(cfg.fgram.table_dir, expect_tokenizer=tokenizer_fp)
  except artifacts.ArtifactError as e:
    raise config_lib.ConfigError(f'{where}: {e}; give an f-gram table built with this '
                                 "run's tokenizer (tokenizer.model_file)") from e
  if table.max_len != cfg.fgram.max_len:
    raise config_lib.ConfigError(f'{where} holds f-grams of up to {table.max_len} tokens; '
                                 f'set config.fgram.max_len={table.max_len}')
  return table


def _shard_dirs(art_dir: str, corpora: _Corpora) -> dict[str, str]:
  dirs = {'train': os.path.join(art_dir, 'tokens', 'train')}
  dirs.update({name: os.path.join(art_dir, 'tokens', f'eval-{name}') for name in corpora.evals})
  return dirs


def _reuse(build: Callable[[], object], check: Callable[[], object], name: str,
           timings: dict[str, float], skipped: list[str]):
  """Returns check() when it succeeds (the stage is current), else build()."""
  start = time.perf_counter()
  try:
    result = check()
    skipped.append(name)
    logging.info('prepare: %s is up to date; skipped', name)
  except artifacts.ArtifactError as e:
    logging.info('prepare: building %s (%s)', name, e)
    result = build()
  timings[name] = time.perf_counter() - start
  return result


def prepare(cfg: Config, workdir: str) -> Prepared:
  """Runs corpus -> tokenizer -> token shards -> f-gram table, skipping current stages.

  Args:
    cfg: the resolved config (data, tokenizer and fgram sections are used).
    workdir: the run directory; artifacts go to cfg.data.artifacts_dir or workdir/prepare.
  """
  cfg = hf_load.resolve_config(cfg)  # model.init_from: the checkpoint's tokenizer.json.
  config_runtime.check_data_source(cfg)  # Before anything is written.
  if paths.exists(paths.join(workdir, run_lib.RUN_FILE)):
    return _prepared_for_run(cfg, workdir)  # Reads only: a run's artifacts are fixed.
  art = artifacts_dir(cfg, workdir)
  artifacts.clean_stale_temps(art)  # Left by a killed prepare (ours only; see there).
  timings: dict[str, float] = {}
  skipped: list[str] = []
  start = time.perf_counter()
  corpora = _corpora(cfg, art, build=True)
  timings['corpus'] = time.perf_counter() - start

  tok_dir = os.path.join(art, 'tokenizer')
  tok_input = _tokenizer_input(cfg, corpora.train)
  meta = {'input_fingerprint': tok_input}

  def build_tokenizer():
    if cfg.tokenizer.model_file:
      return install_tokenizer(cfg.tokenizer.model_file, cfg.tokenizer, tok_dir, meta)
    return train_tokenizer(corpora.train, cfg.tokenizer, tok_dir,
                           corpora.train.total_file_bytes, meta)

  tok = _reuse(build_tokenizer, lambda: open_tokenizer(tok_dir, expect=meta), 'tokenizer',
               timings, skipped)

  shard_dirs = _shard_dirs(art, corpora)
  shards = {}
  for name, directory in shard_dirs.items():
    corpus = corpora.train if name == 'train' else corpora.evals[name]
    expect = {'corpus_fingerprint': corpus.fingerprint}
    shards[name] = _reuse(
        lambda d=directory, c=corpus, n=name: write_shards(
            d, c, tok, c.fingerprint, c.total_file_bytes, name=n,
            extra_meta=lambda: {'bad_utf8_lines': c.stats.bad_utf8_lines,
                                'bad_utf8_chars': c.stats.bad_utf8_chars},
            loss_mask=cfg.data.format in sft.SFT_FORMATS),
        lambda d=directory, e=expect: TokenShards.open(d, tok.fingerprint, expect=e,
                                                       vocab_size=tok.vocab_size),
        f'tokens/{name}', timings, skipped)
  train = shards['train']

  fgram_dir = os.path.join(art, 'fgrams')
  fgram_input = _fgram_input(cfg, tok.fingerprint, train.fingerprint)

  def build_fgrams():
    fc = cfg.fgram
    if fc.table_dir:
      table = _given_table(cfg, tok.fingerprint)
    elif fc.miner == 'beam':
      # Imported only when chosen: apache_beam is heavy and optional for the local miner.
      from scone_jax.fgrams import beam  # pylint: disable=g-import-not-at-top
      table = beam.mine_fgrams_beam(train, max_len=fc.max_len, size=fc.size,
                                    min_count=fc.min_count)
    else:
      table = mine_fgrams(train, max_len=fc.max_len, size=fc.size, min_count=fc.min_count,
                          memory_budget_mb=fc.memory_budget_mb)
    table.meta.update({'tokenizer_fingerprint': tok.fingerprint,
                       'train_fingerprint': train.fingerprint,
                       'input_fingerprint': fgram_input,
                       **({'given': fc.table_dir} if fc.table_dir else {'miner': fc.miner})})
    table.save(fgram_dir)
    return FgramTable.load(fgram_dir, expect_tokenizer=tok.fingerprint)

  table = _reuse(build_fgrams, lambda: _open_fgrams(fgram_dir, tok.fingerprint, fgram_input),
                 'fgrams', timings, skipped)
  check_table_rows(cfg, table)
  timings['total'] = time.perf_counter() - start
  return _prepared(art, shard_dirs, fgram_dir, tok, shards, table, timings, tuple(skipped))


def _prepared(art: str, shard_dirs: dict[str, str], fgram_dir: str, tok: Tokenizer,
              shards: dict[str, TokenShards], table: FgramTable, timings: dict[str, float],
              skipped: tuple[str, ...]) -> Prepared:
  evals = [n for n in shard_dirs if n != 'train']
  return Prepared(
      artifacts_dir=art, train_dir=shard_dirs['train'],
      eval_dirs={n: shard_dirs[n] for n in evals}, fgram_dir=fgram_dir,
      tokenizer_fingerprint=tok.fingerprint, train_fingerprint=shards['train'].fingerprint,
      fgram_fingerprint=table.fingerprint, tokenizer=tok, train_shards=shards['train'],
      eval_shards={n: shards[n] for n in evals}, table=table, timings=timings,
      skipped=skipped)


def check_table_rows(cfg: Config, table: FgramTable) -> None:
  """The S the config asks for must exist in the mined table (a run that uses it).

  A table cut short by min_count would otherwise make every larger S the same run under
  another name (a sweep's S=1000 and S=2000 points training on one 393-row table).
  """
  want = cfg.fgram.requested_rows
  if (not cfg.fgram_model.uses_fgram_table or len(table) >= want
      or cfg.fgram.allow_short_table):
    return
  key = 'fgram.use_size' if want != cfg.fgram.size else 'fgram.size'
  if table.min_count > 1:
    # Every f-gram counted >= min_count is in the table already (it is shorter than
    # fgram.size): only a lower min_count admits more.
    more = (f'--config.fgram.min_count={table.min_count - 1} or lower would mine more (every'
            f' f-gram seen >= {table.min_count} times is in; the last row was seen '
            f'{table.cutoff_count} times)')
  else:
    more = 'no min_count gives more (every n-gram of the corpus is in); use a larger corpus'
  raise ShortTableError(
      f'config.{key}={want:,} but the mined f-gram table has only {len(table):,} rows '
      f'(fgram.min_count={table.min_count}); {more}. Lower config.{key} to at most '
      f'{len(table):,}, or set --config.fgram.allow_short_table=True to train on all '
      f'{len(table):,} rows (W/run.json then records S = {len(table):,})')


def _prepared_for_run(cfg: Config, workdir: str) -> Prepared:
  """The artifacts the run in `workdir` trained with (W/run.json), reopened, after checking
  that this config's inputs are the ones they were built from; never rebuilds one."""
  start = time.perf_counter()
  run_dir = run_lib.RunDir(workdir)
  tok = run_dir.tokenizer()
  tok_dir = os.path.dirname(tok.path)
  art = os.path.dirname(tok_dir)
  corpora = _corpora(cfg, art, build=False)
  train = run_dir.train_shards()
  evals = run_dir.eval_shards()
  changed = []
  tok_manifest = artifacts.read_manifest(tok_dir, spm_lib.KIND, verify=False)
  if tok_manifest.get('input_fingerprint') != _tokenizer_input(cfg, corpora.train):
    changed.append('the tokenizer\'s inputs (config.tokenizer, the tokenizer.model_file '
                   'contents, or the train corpus it was trained on)')
  names = sorted(corpora.evals)
  if names != sorted(evals):
    changed.append(f'the eval corpora (the run has {sorted(evals)}, this config names '
                   f'{names})')
  for name, shards in {'train': train, **evals}.items():
    corpus = corpora.train if name == 'train' else corpora.evals.get(name)
    if corpus is not None and shards.manifest.get('corpus_fingerprint') != corpus.fingerprint:
      changed.append(f'corpus {name!r} ({", ".join(corpus.paths[:3])}'
                     f'{", ..." if len(corpus.paths) > 3 else ""}: the files, their sizes or '
                     'modification times differ from when the run was prepared)')
  fgram_dir = os.path.join(art, 'fgrams')  # Tokenizer and table are siblings in A.
  table = run_dir.table()
  if table is None:  # A run without an f-gram side: the table is only carried along.
    table = FgramTable.load(fgram_dir, expect_tokenizer=tok.fingerprint)
  elif table.meta.get('input_fingerprint') != _fgram_input(cfg, tok.fingerprint,
                                                           train.fingerprint):
    changed.append('the f-gram table\'s inputs (config.fgram: max_len, size, min_count)')
  if changed:
    raise RunInputsChangedError(
        f'{run_dir.path} holds a run trained on other inputs than this config names; '
        f'changed: {"; ".join(changed)}. A run is never rebuilt under new inputs (its '
        'checkpoints would continue on other token ids). Choose one: restore the inputs the '
        'run was trained on; or train a new run in a new --workdir; or start a new run from '
        f'this one\'s latest weights: --workdir=NEW --config.train.init_from_run='
        f'{run_dir.path}')
  check_table_rows(cfg, table)
  shard_dirs = {'train': train.directory, **{n: s.directory for n, s in evals.items()}}
  shards = {'train': train, **evals}
  stages = ('tokenizer', *(f'tokens/{n}' for n in shards), 'fgrams')
  timings = {'total': time.perf_counter() - start}
  return _prepared(art, shard_dirs, fgram_dir, tok, shards, table, timings, stages)


def _open_fgrams(directory: str, tokenizer_fp: str, input_fp: str) -> FgramTable:
  table = FgramTable.load(directory, expect_tokenizer=tokenizer_fp)
  have = table.meta.get('input_fingerprint')
  if have != input_fp:
    raise artifacts.ArtifactError(
        f'f-gram table at {directory} was mined from other inputs (input_fingerprint '
        f'{have!r}, this config needs {input_fp!r}); rerun prepare')
  return table


def load_prepared(cfg: Config, workdir: str, verify: bool = True) -> Prepared:
  """Opens existing artifacts; ArtifactError naming the missing or stale stage otherwise.

  Args:
    cfg: the resolved config.
    workdir: the run directory.
    verify: also recompute the artifacts' sha256 checksums (sizes are always checked).
  """
  art = artifacts_dir(cfg, workdir)
  fix = ('; run `python -m scone_jax.prepare` with this config and workdir (artifacts: '
         f'{art})')
  try:
    corpora = _corpora(cfg, art, build=False)
    tok_dir = os.path.join(art, 'tokenizer')
    tok = open_tokenizer(tok_dir, expect={'input_fingerprint':
                                          _tokenizer_input(cfg, corpora.train)})
    shard_dirs = _shard_dirs(art, corpora)
    shards = {}
    for name, directory in shard_dirs.items():
      corpus = corpora.train if name == 'train' else corpora.evals[name]
      shards[name] = TokenShards.open(directory, tok.fingerprint, verify=verify,
                                      expect={'corpus_fingerprint': corpus.fingerprint},
                                      vocab_size=tok.vocab_size)
    fgram_dir = os.path.join(art, 'fgrams')
    table = _open_fgrams(fgram_dir, tok.fingerprint,
                         _fgram_input(cfg, tok.fingerprint, shards['train'].fingerprint))
  except artifacts.ArtifactError as e:
    raise artifacts.ArtifactError(f'prepared artifacts are missing or stale: {e}{fix}') from e
  return _prepared(art, shard_dirs, fgram_dir, tok, shards, table, {}, ())


def summary(prepared: Prepared) -> str:
  """A human-readable report: corpus sizes, tokenizer, tokens, f-gram table, timings."""
  lines = [f'artifacts: {prepared.artifacts_dir}']
  tok_manifest = artifacts.read_manifest(os.path.join(prepared.artifacts_dir, 'tokenizer'),
                                         spm_lib.KIND, verify=False)
  lines.append(f'tokenizer: vocab {prepared.tokenizer.vocab_size}, '
               f'{tok_manifest.get("model_type", "loaded")} '
               f'({tok_manifest.get("source")}), fingerprint '
               f'{prepared.tokenizer_fingerprint[:16]}')
  lines.append(f'{"split":<16}{"docs":>10}{"chars":>14}{"UTF-8 bytes":>14}{"tokens":>12}'
               f'{"bytes/token":>12}{"bad UTF-8":>10}')
  splits = {'train': prepared.train_shards,
            **{f'eval-{n}': s for n, s in prepared.eval_shards.items()}}
  for name, shards in splits.items():
    m = shards.manifest
    lines.append(f'{name:<16}{m["num_docs"]:>10,}{m["num_chars"]:>14,}{m["num_bytes"]:>14,}'
                 f'{m["num_tokens"]:>12,}{m["num_bytes"] / m["num_tokens"]:>12.2f}'
                 f'{m.get("bad_utf8_chars", 0):>10,}')
  table = prepared.table
  hist = np.bincount(np.asarray(table.lengths), minlength=table.max_len + 1)[2:]
  lines.append(f'f-grams: {len(table):,} (K={table.max_len}, min_count={table.min_count}, '
               f'cutoff count {table.cutoff_count}); by length: ' +
               ', '.join(f'{n}: {int(c):,}' for n, c in enumerate(hist, start=2)))
  if prepared.timings:
    lines.append('seconds: ' + ', '.join(
        f'{k} {v:.1f}{" (reused)" if k in prepared.skipped else ""}'
        for k, v in prepared.timings.items()))
  return '\n'.join(lines)


def main(argv):
  del argv
  print(summary(prepare(cli.config_from_file(_CONFIG), _WORKDIR.value)))


if __name__ == '__main__':
  cli.run('prepare', main, FLAGS)
