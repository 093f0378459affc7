"""Every entry point turns a user's mistake into one line on stderr and exit status 2.

The table `CASES` runs each `python -m scone_jax.<entry>` on a bad input: a bad value, a
missing or file-shaped workdir, a corrupt or truncated run file, a held lock, a bad config
path, an unreachable bucket. Each must exit with its status (2: a user error) with exactly
one non-empty stderr line `<entry>: ...` that names the input, no traceback, in under 10 s
of CPU. One trained (and exported) micro run is built per module; a case that damages a run
gets a copy, and after every case the good run and the shared prepared artifacts are
checked byte for byte. Adding a case is one `Case(...)` row.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import logging
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import types
from typing import Callable

import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import cli, logs, runlock
from scone_jax import config as config_lib
from scone_jax.sweeps import analysis
from scone_jax.train import checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU seconds a failing command may take (load-independent, unlike wall time: the test
# machine is shared); it covers starting Python and importing JAX.
CPU_SECONDS = 10.0
# An endpoint nothing listens on: the gs:// client can reach no bucket there.
UNREACHABLE_GCS = {'STORAGE_EMULATOR_HOST': 'http://127.0.0.1:9',
                   'TENSORSTORE_GCS_HTTP_URL': 'http://127.0.0.1:9',
                   'GCE_METADATA_ROOT': 'metadata.google.internal.invalid',
                   'FSSPEC_GS_TOKEN': 'anon', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


@dataclasses.dataclass(frozen=True)
class Ctx:
  """What a case's argv may name."""
  run: str  # The good run, or (for a case with `damage`) a damaged copy of it.
  config: str  # The experiment file the good run was trained from.
  tmp: str  # An empty directory of this case.
  train: str = ''  # The good run's training corpus file (read, never written).

  @property
  def file(self) -> str:
    """A regular file where a directory is expected."""
    path = os.path.join(self.tmp, 'a_file')
    with open(path, 'w') as f:
      f.write('not a run\n')
    return path

  @property
  def missing(self) -> str:
    return os.path.join(self.tmp, 'no_such_run')


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  argv: Callable[[Ctx], list[str]]  # [entry, flags...]; runs python -m scone_jax.<entry>.
  expect: tuple[str, ...]  # Substrings of the one stderr line.
  status: int = cli.USER_ERROR_STATUS
  damage: Callable[[str], None] | None = None  # Applied to a copy of the good run.
  env: tuple[tuple[str, str], ...] = ()
  marks: tuple = ()  # pytest marks of this row.


# ---------------------------------------------------------------- damage to a run copy


def _truncate(rel: str) -> Callable[[str], None]:
  def damage(run: str) -> None:
    path = os.path.join(run, rel)
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.truncate(size // 2)
  return damage


def _latest_checkpoint_files(run: str) -> list[str]:
  ckpt = os.path.join(run, 'checkpoints')
  step = max((d for d in os.listdir(ckpt) if d.isdigit()), key=int)
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(ckpt, step))
           for n in names]
  return sorted(files, key=os.path.getsize, reverse=True)


def _corrupt_checkpoint(run: str) -> None:
  """Truncates every array file of the latest step (the model state cannot be read)."""
  for path in _latest_checkpoint_files(run):
    if os.path.getsize(path) > 1024:
      with open(path, 'r+b') as f:
        f.truncate(64)


def _remove_checkpoints(run: str) -> None:
  shutil.rmtree(os.path.join(run, 'checkpoints'))
  os.makedirs(os.path.join(run, 'checkpoints'))


def _remove_export(run: str) -> None:
  shutil.rmtree(os.path.join(run, 'export'))


def _hold_lock(run: str) -> None:
  """W/.lock of a live process on this host (the test itself)."""
  with open(os.path.join(run, runlock.LOCK_FILE), 'w') as f:
    json.dump({'pid': os.getpid(), 'host': socket.gethostname(),
               'started': '2026-12-07T00:00:00Z'}, f)


def _write(tmp: str, name: str, text: str) -> str:
  path = os.path.join(tmp, name)
  with open(path, 'w') as f:
    f.write(text)
  return path


def _write_bytes(tmp: str, name: str, data: bytes) -> str:
  path = os.path.join(tmp, name)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def _flip_checkpoint_bytes(run: str) -> None:
  """Scattered byte flips inside the latest step's largest file (size and names kept):
  the bit rot a truncation check cannot see."""
  path = _latest_checkpoint_files(run)[0]
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    for offset in range(size // 7, size, max(1, size // 7)):
      f.seek(offset)
      byte = f.read(1)
      f.seek(offset)
      f.write(bytes([byte[0] ^ 0xFF]))


def _fresh_prepare(c: 'Ctx', *flags_: str) -> list[str]:
  """prepare into a new workdir with its own artifacts (the shared ones stay untouched)."""
  return ['prepare', f'--config={c.config}', '--config.data.artifacts_dir=',
          f'--workdir={c.missing}', *flags_]


def _sweep_file(tmp: str, points: list[dict]) -> str:
  return _write(tmp, 'bad_sweep.py', f"BASE_CONFIG = 'experiments/tiny.py'\n\n\n"
                f'def get_sweep():\n  return {points!r}\n')


# ------------------------------------------------------------------------------ cases

CASES = [
    # prepare
    Case('prepare-bad-value', lambda c: ['prepare', f'--config={c.config}',
                                         '--config.fgram.size=0', f'--workdir={c.missing}'],
         ('config.fgram.size=0 must be >= 1',)),
    Case('prepare-unknown-key', lambda c: ['prepare', f'--config={c.config}',
                                           '--config.fgram.sise=5', f'--workdir={c.missing}'],
         ('--config.fgram.sise', "did you mean 'size'")),
    Case('prepare-missing-config', lambda c: ['prepare', '--config=experiments/nope.py',
                                              f'--workdir={c.missing}'],
         ("'experiments/nope.py' does not exist", 'repo root')),
    Case('prepare-config-does-not-parse',
         lambda c: ['prepare', f'--config={_write(c.tmp, "broken.py", "def get_config(:")}',
                    f'--workdir={c.missing}'], ('broken.py',)),
    Case('prepare-no-config', lambda c: ['prepare', f'--workdir={c.missing}'],
         ('--config=experiments/<preset>.py is required',)),
    Case('prepare-workdir-is-a-file', lambda c: ['prepare', f'--config={c.config}',
                                                 '--config.data.artifacts_dir=',
                                                 f'--workdir={c.file}'],
         ('a_file', 'is a file, not a directory')),
    # train
    Case('train-bad-value', lambda c: ['train', f'--config={c.config}',
                                       '--config.train.learning_rate=-1.0',
                                       f'--workdir={c.missing}'],
         ('config.train.learning_rate=-1.0 must be > 0',)),
    Case('train-bad-type', lambda c: ['train', f'--config={c.config}',
                                      '--config.train.steps=many', f'--workdir={c.missing}'],
         ('--config.train.steps=many',)),
    Case('train-missing-config', lambda c: ['train', '--config=experiments/nope.py',
                                            f'--workdir={c.missing}'],
         ("'experiments/nope.py' does not exist",)),
    Case('train-unknown-flag', lambda c: ['train', f'--config={c.config}', '--wokdir=x'],
         ("Unknown command line flag 'wokdir'",)),
    Case('train-positional-argument', lambda c: ['train', f'--config={c.config}',
                                                 f'--workdir={c.missing}', 'extra'],
         ("unexpected arguments ['extra']",)),
    Case('train-workdir-is-a-file', lambda c: ['train', f'--config={c.config}',
                                               f'--workdir={c.file}'],
         ('a_file', 'is a file, not a directory')),
    Case('train-held-lock', lambda c: ['train', f'--config={c.config}', f'--workdir={c.run}'],
         (f'is being written by pid {os.getpid()}', '.lock'), damage=_hold_lock),
    Case('train-resume-changes-math', lambda c: ['train', f'--config={c.config}',
                                                 '--config.train.steps=20',
                                                 f'--workdir={c.run}'],
         ('train.steps: 4 in the run, 20 now', '--allow_config_change'),
         damage=lambda run: None),
    Case('train-truncated-config-json', lambda c: ['train', f'--config={c.config}',
                                                   f'--workdir={c.run}'],
         ('config.json is truncated or corrupt',), damage=_truncate('config.json')),
    Case('train-unreachable-bucket', lambda c: ['train', f'--config={c.config}',
                                                '--workdir=gs://no-such-bucket/run'],
         ('gs://no-such-bucket/run', 'credentials'), env=tuple(UNREACHABLE_GCS.items())),
    # evaluate
    Case('evaluate-missing-workdir', lambda c: ['evaluate', f'--workdir={c.missing}'],
         ('no_such_run', 'config.json does not exist')),
    Case('evaluate-no-workdir', lambda c: ['evaluate'], ('--workdir',)),
    Case('evaluate-workdir-is-a-file', lambda c: ['evaluate', f'--workdir={c.file}'],
         ('a_file',)),
    Case('evaluate-bad-value', lambda c: ['evaluate', f'--workdir={c.run}',
                                          '--eval_batches=-1'],
         ('eval_batches=-1',)),
    Case('evaluate-bad-type', lambda c: ['evaluate', f'--workdir={c.run}', '--step=last'],
         ('--step=last',)),
    Case('evaluate-missing-step', lambda c: ['evaluate', f'--workdir={c.run}', '--step=3'],
         ('checkpoint step 3', 'committed steps')),
    Case('evaluate-truncated-config-json', lambda c: ['evaluate', f'--workdir={c.run}'],
         ('config.json is corrupted',), damage=_truncate('config.json')),
    Case('evaluate-truncated-run-json', lambda c: ['evaluate', f'--workdir={c.run}'],
         ('run.json is corrupted',), damage=_truncate('run.json')),
    Case('evaluate-no-checkpoint', lambda c: ['evaluate', f'--workdir={c.run}'],
         ('holds no checkpoint',), damage=_remove_checkpoints),
    Case('evaluate-corrupt-checkpoint', lambda c: ['evaluate', f'--workdir={c.run}'],
         ('checkpoints',), damage=_corrupt_checkpoint),
    # export
    Case('export-missing-workdir', lambda c: ['export', f'--workdir={c.missing}'],
         ('no_such_run', 'config.json does not exist')),
    Case('export-workdir-is-a-file', lambda c: ['export', f'--workdir={c.file}'],
         ('a_file',)),
    Case('export-fixed-key', lambda c: ['export', f'--workdir={c.run}',
                                        '--config.model.d_model=64'],
         ('--config.model.d_model cannot be changed here', '--config.export.*')),
    Case('export-unknown-key', lambda c: ['export', f'--workdir={c.run}',
                                          '--config.export.dtipe=bfloat16'],
         ("--config.export.dtipe: the config has no key 'export.dtipe'",)),
    Case('export-truncated-config-json', lambda c: ['export', f'--workdir={c.run}'],
         ('config.json is corrupted',), damage=_truncate('config.json')),
    Case('export-corrupt-checkpoint', lambda c: ['export', f'--workdir={c.run}'],
         ('checkpoints',), damage=_corrupt_checkpoint),
    Case('export-unreachable-bucket', lambda c: ['export', '--workdir=gs://no-such-bucket/r'],
         ('gs://no-such-bucket/r', 'credentials'), env=tuple(UNREACHABLE_GCS.items())),
    # generate
    Case('generate-missing-workdir', lambda c: ['generate', f'--workdir={c.missing}',
                                                '--prompt=the'],
         ('no_such_run', 'config.json does not exist')),
    Case('generate-bad-value', lambda c: ['generate', f'--workdir={c.run}', '--prompt=the',
                                          '--config.serve.top_p=0'],
         ('config.serve.top_p=0.0 must be in (0, 1]',)),
    Case('generate-old-flag', lambda c: ['generate', f'--workdir={c.run}', '--prompt=the',
                                         '--max_new_tokens=5'],
         ("Unknown command line flag 'max_new_tokens'",)),
    Case('generate-fixed-key', lambda c: ['generate', f'--workdir={c.run}', '--prompt=the',
                                          '--config.export.dtype=float32'],
         ('--config.export.dtype cannot be changed here', '--config.serve.*')),
    Case('generate-no-prompt', lambda c: ['generate', f'--workdir={c.run}'],
         ('--prompt',)),
    Case('generate-no-export', lambda c: ['generate', f'--workdir={c.run}', '--prompt=the'],
         ('export', 'python -m scone_jax.export'), damage=_remove_export),
    Case('generate-truncated-config-json', lambda c: ['generate', f'--workdir={c.run}',
                                                      '--prompt=the'],
         ('config.json is corrupted',), damage=_truncate('config.json')),
    Case('generate-corrupt-checkpoint', lambda c: ['generate', f'--workdir={c.run}',
                                                   '--prompt=the'],
         ('checkpoints',), damage=_corrupt_checkpoint),
    # report
    Case('report-missing-root', lambda c: ['report', '--sweep=experiments/sweeps/demo.py',
                                           f'--root={c.missing}'],
         ('no_such_run', 'run the sweep first')),
    Case('report-no-sweep', lambda c: ['report', f'--root={c.tmp}'], ('--sweep',)),
    Case('report-root-is-a-file', lambda c: ['report', '--sweep=experiments/sweeps/demo.py',
                                             f'--root={c.file}'],
         ('a_file', 'is a file, not a directory')),
    # sweeps
    Case('sweeps-missing-file', lambda c: ['sweeps', '--sweep=experiments/sweeps/nope.py',
                                           f'--root={c.tmp}', '--dry_run'],
         ("'experiments/sweeps/nope.py' does not exist", 'nothing was launched')),
    Case('sweeps-unknown-key', lambda c: ['sweeps', '--dry_run', f'--root={c.tmp}',
                                          f'--sweep={_sweep_file(c.tmp, [{"train.sede": 1}])}'],
         ("unknown config key 'train.sede'", 'nothing was launched')),
    Case('sweeps-bad-set', lambda c: ['sweeps', '--sweep=experiments/sweeps/demo.py',
                                      '--set=train.steps', f'--root={c.tmp}', '--dry_run'],
         ("--set='train.steps' must look like KEY=VALUE",)),
    # issue 22's faults: corpora that are not what data.format says, test leakage, a table
    # shorter than its S, a forbidden resume change, bit rot in a checkpoint, ...
    Case('prepare-gzip-corpus', lambda c: _fresh_prepare(c, '--config.data.train_files=' + (
        _write_bytes(c.tmp, 't.txt', gzip.compress(b'the of and ' * 999)))),
         ('t.txt', 'gzip', 'decompress')),
    Case('prepare-binary-corpus', lambda c: _fresh_prepare(c, '--config.data.train_files=' + (
        _write_bytes(c.tmp, 't.bin', bytes(range(256)) * 64))),
         ('t.bin', 'NUL bytes')),
    Case('prepare-jsonl-read-as-lines', lambda c: _fresh_prepare(
        c, '--config.data.train_files=' + _write(c.tmp, 't.jsonl', '{"text": "the"}\n' * 50)),
         ('t.jsonl', 'jsonl')),
    Case('prepare-eval-file-is-a-train-file', lambda c: _fresh_prepare(
        c, f'--config.data.eval_files=leak={c.train}'), ('also a training file',)),
    Case('prepare-no-eval-files', lambda c: _fresh_prepare(c, '--config.data.eval_files='),
         ('config.data.eval_files is empty', 'allow_no_eval')),
    Case('prepare-table-shorter-than-size', lambda c: _fresh_prepare(
        c, '--config.fgram.size=1000000'),
         ('config.fgram.size=1,000,000', 'min_count', 'allow_short_table')),
    Case('train-forbidden-resume-change', lambda c: [
        'train', f'--config={c.config}', '--config.model.d_model=64',
        '--allow_config_change=model.d_model', f'--workdir={c.run}'],
         ('model.d_model',), damage=lambda run: None),
    Case('evaluate-flipped-checkpoint-bytes', lambda c: ['evaluate', f'--workdir={c.run}'],
         ('checkpoint', 'scone_jax.verify'), damage=_flip_checkpoint_bytes),
    Case('export-flipped-checkpoint-bytes', lambda c: ['export', f'--workdir={c.run}'],
         ('checkpoint', 'scone_jax.verify'), damage=_flip_checkpoint_bytes),
    Case('generate-prompt-fills-the-context', lambda c: [
        'generate', f'--workdir={c.run}', '--prompt=' + ' w1 w2 w3' * 40], ('context',)),
    Case('verify-missing-workdir', lambda c: ['verify', f'--workdir={c.missing}'],
         ('no_such_run',)),
    Case('verify-workdir-is-a-file', lambda c: ['verify', f'--workdir={c.file}'],
         ('a_file',)),
    Case('downstream-missing-task-dir', lambda c: [
        'downstream', f'--workdir={c.run}', '--tasks=arc_easy', f'--task_dir={c.missing}'],
         ('no_such_run',)),
    Case('downstream-unknown-task', lambda c: [
        'downstream', f'--workdir={c.run}', '--tasks=nope', f'--task_dir={c.tmp}'],
         ('nope',)),
    Case('sweeps-tpu-without-target', lambda c: ['sweeps', '--sweep=experiments/sweeps/demo.py',
                                                 '--backend=tpu', f'--root={c.tmp}',
                                                 '--dry_run'],
         ('--backend=tpu needs --tpu_name, --zone, --repo',)),
]


# ---------------------------------------------------------------------------- fixtures


@dataclasses.dataclass(frozen=True)
class GoodRun:
  run: str
  config: str
  artifacts: str
  train: str  # Its training corpus file.


@pytest.fixture(scope='module')
def good(tmp_path_factory) -> GoodRun:
  """The session's micro reference run, copied and exported (generate needs its store)."""
  from scone_jax.export.export import export_store  # JAX must see conftest's flags first.
  base = str(tmp_path_factory.getbasetemp())
  cfg, reference = th.reference_run(base)
  corpus, artifacts = th.shared_dirs(base)
  here = tmp_path_factory.mktemp('cli')
  run = str(here / 'good_run')
  shutil.copytree(reference, run)
  export_store(cfg, run)
  config = th.micro_config_file(str(here / 'micro.py'), corpus, artifacts)
  return GoodRun(run, config, artifacts, os.path.join(corpus, 'train.txt'))


def _run_cli(argv: list[str], env: dict[str, str] | None = None, cwd: str = REPO,
             module: bool = True) -> tuple[subprocess.CompletedProcess, float]:
  """Runs `python -m scone_jax.<argv[0]> argv[1:]`; returns it and its CPU seconds."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  cmd = ([sys.executable, '-m', f'scone_jax.{argv[0]}'] if module else [sys.executable])
  done = subprocess.run(cmd + argv[1:], env={**th.subprocess_env(1), **(env or {})}, cwd=cwd,
                        capture_output=True, text=True, timeout=300)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return done, cpu


# orbax's warnings when a reader opened a run's checkpoints read-only: gone since RunDir
# lists and restores checkpoints without a read-only manager
# (test_reopening_a_run_logs_no_orbax_warnings).
_ORBAX_READ_ONLY = re.compile(r'checkpoint_manager\.py:\d+\] (CheckpointManagerOptions\.'
                              r'read_only=True|Given directory is read only)')


# What a stage prints while it works before it meets the bad input (prepare's INFO progress
# lines, tqdm bars): not messages. Warnings and errors all count.
_PROGRESS = re.compile(r'^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] |\d+%\|')


def _one_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.strip() and not _PROGRESS.search(l)]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize('case', [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_user_error_is_one_line_and_status_2(case, good, tmp_path):
  before = th.tree_digest(good.run, good.artifacts)
  run = good.run
  if case.damage is not None:
    run = str(tmp_path / 'run')
    shutil.copytree(good.run, run)
    case.damage(run)
  work = tmp_path / 'tmp'
  work.mkdir()
  argv = case.argv(Ctx(run=run, config=good.config, tmp=str(work), train=good.train))
  done, cpu = _run_cli(argv, dict(case.env))
  assert done.returncode == case.status, done.stderr[-3000:]
  line = _one_line(done.stderr)
  assert 'Traceback' not in done.stderr
  assert line.startswith(f'{argv[0]}: '), line
  for want in case.expect:
    assert want in line, line
  assert cpu < CPU_SECONDS, f'{cpu:.1f} CPU seconds'
  assert th.tree_digest(good.run, good.artifacts) == before  # Nothing written to the good run.


def test_traceback_on_request(tmp_path):
  argv = ['evaluate', f'--workdir={tmp_path / "no_such_run"}']
  for extra, env in ((['--verbosity=1'], {}), ([], {cli.TRACEBACK_ENV: '1'})):
    done, _ = _run_cli(argv + extra, env)
    assert done.returncode == cli.USER_ERROR_STATUS
    assert 'Traceback' in done.stderr and 'RunError' in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith('evaluate: ')


def test_a_bug_keeps_its_traceback_and_status_1(tmp_path):
  script = _write(str(tmp_path), 'entry.py', textwrap.dedent('''\
      from absl import flags
      from scone_jax import cli
      FLAGS = flags.FlagValues()
      def main(argv):
        raise ZeroDivisionError('a bug, not the user')
      cli.run('entry', main, FLAGS)
      '''))
  done, _ = _run_cli(['', script], module=False)
  assert done.returncode == 1
  assert 'Traceback' in done.stderr and 'ZeroDivisionError: a bug' in done.stderr


def test_os_errors_of_the_users_disk_are_one_line():
  full = OSError(errno.ENOSPC, 'No space left on device', '/runs/x/eval.json')
  assert cli.user_error_message(full) == (
      '/runs/x/eval.json: No space left on device; the disk is full: free space there or '
      'pass a --workdir on another disk')
  assert 'read-only' in cli.user_error_message(
      OSError(errno.EROFS, 'Read-only file system', '/ro/W'))
  # A failed write often carries no file name: the message places it under the workdir.
  assert cli.user_error_message(OSError(errno.ENOSPC, 'No space left on device'),
                                '/runs/x').startswith('writing under /runs/x: No space left')
  assert cli.user_error_message(OSError(errno.EIO, 'I/O error', '/x')) is None  # A bug/HW.
  assert cli.user_error_message(ValueError('x')) is None
  # A failed checkpoint save (a full disk under orbax) stops train with its one line.
  saved = checkpoint_lib.CheckpointSaveError('saving checkpoint step 2 failed (ENOSPC)')
  assert cli.user_error_message(saved) == 'saving checkpoint step 2 failed (ENOSPC)'


def test_relative_config_and_sweep_files_resolve_from_any_directory(tmp_path):
  """The docs' commands (paths relative to the repo root) work from another directory."""
  printed, _ = _run_cli(['train', '--config=experiments/tiny.py', '--print_config'],
                        cwd=str(tmp_path))
  assert printed.returncode == 0, printed.stderr[-3000:]
  assert json.loads(printed.stdout)['name']
  # The sweep file and its BASE_CONFIG (experiments/demo.py:micro) both.
  dry, _ = _run_cli(['sweeps', '--sweep=experiments/sweeps/demo_micro.py',
                     f'--root={tmp_path / "runs"}', '--dry_run'], cwd=str(tmp_path))
  assert dry.returncode == 0, dry.stderr[-3000:]
  assert 'sweep demo_micro: 8 point(s)' in dry.stdout


def test_missing_config_names_both_places(tmp_path):
  done, _ = _run_cli(['train', '--config=experiments/nope.py', '--print_config'],
                     cwd=str(tmp_path))
  line = _one_line(done.stderr)
  assert str(tmp_path) in line and REPO in line


def test_evaluate_on_a_read_only_run_prints_its_numbers_first(good, tmp_path):
  """The disk refuses W/eval.json: the results are on stdout, then one line names it."""
  run = str(tmp_path / 'run')
  shutil.copytree(good.run, run)
  os.remove(os.path.join(run, 'eval.json'))
  # Root ignores file modes, so the refusal is injected where eval.json is written.
  script = _write(str(tmp_path), 'ro.py', textwrap.dedent(f'''\
      import errno, runpy, sys
      from scone_jax import artifacts
      def read_only(path, record):
        raise OSError(errno.EROFS, 'Read-only file system', path + '.tmp')
      artifacts.write_json_atomic = read_only
      sys.argv = ['evaluate', '--workdir={run}']
      runpy.run_module('scone_jax.evaluate', run_name='__main__')
      '''))
  done, _ = _run_cli(['', script], module=False)
  assert done.returncode == cli.USER_ERROR_STATUS, done.stderr[-3000:]
  assert 'eval step 4 heldout (test): loss' in done.stdout
  line = _one_line(done.stderr)
  assert f'{run}/eval.json could not be written (Read-only file system)' in line
  assert 'printed above' in line
  assert not os.path.exists(os.path.join(run, 'eval.json'))


def test_generate_cuts_max_new_tokens_to_the_context(good):
  before = th.tree_digest(good.run)
  done, _ = _run_cli(['generate', f'--workdir={good.run}', '--prompt=the of and',
                      '--config.serve.temperature=0'])
  assert done.returncode == 0, done.stderr[-3000:]
  # The default max_new_tokens (64) does not fit the micro model's 32-token context.
  assert 'max_new_tokens=64 cut to' in done.stderr and 'context of 32 tokens' in done.stderr
  assert done.stdout.startswith('the of and')
  assert th.tree_digest(good.run) == before


def test_closed_event_loop_noise_is_dropped():
  """After a failed bucket write, asyncio's 'Event loop is closed' reports are noise."""
  f = logs.ThirdPartyInfoFilter()

  def asyncio_error(exc):
    return logging.LogRecord('asyncio', logging.ERROR, '/asyncio/base_events.py', 1,
                             'Task exception was never retrieved', None,
                             (type(exc), exc, None))
  assert not f.filter(asyncio_error(RuntimeError('Event loop is closed')))
  assert f.filter(asyncio_error(RuntimeError('a real failure')))
  seen = []
  hook = types.SimpleNamespace
  logs._quiet_unraisable(hook(exc_value=RuntimeError('Event loop is closed')), seen.append)
  assert not seen
  logs._quiet_unraisable(hook(exc_value=ValueError('x')), seen.append)
  assert len(seen) == 1


def test_report_arm_names_show_only_the_varying_keys():
  """A key every run shares (a --set data path) is not part of an arm's name."""
  shared = {'data.train_files': '/data/corpus/train*.txt', 'train.steps': 300}
  cfg = config_lib.from_configdict(config_lib.base_config())
  runs = [types.SimpleNamespace(name=f'r{size}-{seed}', cfg=cfg, num_fgrams=size,
                                overrides={**shared, 'fgram.use_size': size, 'train.seed': seed})
          for size in (256, 1024) for seed in (0, 1)]
  arms, _ = analysis.arms_of(runs, None)
  assert sorted(a.name for a in arms) == ['use_size=1024', 'use_size=256']
  assert sorted(len(a.runs) for a in arms) == [2, 2]


def test_reopening_a_run_logs_no_orbax_warnings(good, tmp_path):
  done, _ = _run_cli(['evaluate', f'--workdir={good.run}', '--step=3'])  # No step 3.
  assert done.returncode == cli.USER_ERROR_STATUS
  assert not _ORBAX_READ_ONLY.search(done.stderr), done.stderr[-3000:]
