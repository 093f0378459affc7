"""Every check before any work (a table of bad configs) and the integrity guards: token ids
past the vocabulary, a corrupt latest checkpoint, one writer per run, a failed async save,
temporaries left by a killed stage."""

import errno
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import artifacts, runlock
from scone_jax import config as config_lib
from scone_jax import config_runtime
from scone_jax import prepare as prepare_lib
from scone_jax.config import ConfigError
from scone_jax.tokenizer import shards as shards_lib
from scone_jax.train import checkpoint as checkpoint_lib
from scone_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (dotted overrides of the micro config, what the error must say). Devices: the 8 fake
# CPU devices of conftest; the micro batch is 8.
BAD_VALUES = [
    ({'train.learning_rate': -1.0}, r'config\.train\.learning_rate=-1\.0 must be > 0'),
    ({'train.learning_rate': 0.0}, r'config\.train\.learning_rate=0\.0 must be > 0'),
    ({'train.learning_rate': float('nan')}, r'config\.train\.learning_rate=nan'),
    ({'train.grad_clip': -1.0}, r'config\.train\.grad_clip=-1\.0 must be >= 0'),
    ({'checkpoint.keep': 0}, r'config\.checkpoint\.keep=0 must be >= 1'),
    ({'checkpoint.every_steps': -1}, r'config\.checkpoint\.every_steps=-1'),
    ({'train.batch_size': 0}, r'config\.train\.batch_size=0 must be >= 1'),
    ({'train.steps': 0}, r'config\.train\.steps=0 must be >= 1'),
    ({'train.warmup_steps': -5}, r'config\.train\.warmup_steps=-5 must be >= 0'),
    ({'train.lr_end_ratio': 1.5}, r'config\.train\.lr_end_ratio=1\.5 must be in \[0, 1\]'),
    ({'train.b2': 1.0}, r'config\.train\.b2=1\.0 must be in \[0, 1\)'),
    ({'train.eps': 0.0}, r'config\.train\.eps=0\.0 must be > 0'),
    ({'train.weight_decay': -0.1}, r'config\.train\.weight_decay=-0\.1'),
    ({'train.fgram_model_lr_scale': -1.0}, r'config\.train\.fgram_model_lr_scale=-1\.0'),
    ({'model.d_model': 0}, r'config\.model\.d_model=0 must be >= 1'),
    ({'model.num_heads': 3}, r'config\.model\.d_model=32 is not divisible by '
                             r'config\.model\.num_heads=3'),
    ({'fgram.size': 0}, r'config\.fgram\.size=0 must be >= 1'),
    ({'fgram.max_len': 1}, r'config\.fgram\.max_len=1 must be >= 2'),
    ({'fgram.use_size': 5000}, r'config\.fgram\.use_size=5000 must be in \[0, '
                               r'fgram\.size=2000\]'),
    ({'train.seq_len': 64}, r'config\.train\.seq_len=64 is larger than the position table '
                            r'config\.model\.max_seq_len=32'),
    ({'model.norm': 'batchnorm'}, r"config\.model\.norm='batchnorm' is not one of"),
    ({'fgram.miner': 'spark'}, r"config\.fgram\.miner='spark' is not one of"),
    ({'model.attention': 'cudnn'}, r"config\.model\.attention='cudnn' needs "
                                   r"config\.model\.dtype='bfloat16'"),
    ({'model.attention': 'cudnn', 'model.dtype': 'bfloat16'},
     r"config\.model\.attention='cudnn' needs an NVIDIA GPU, but the backend is 'cpu'"),
    ({'serve.top_p': 0.0}, r'config\.serve\.top_p=0\.0 must be in \(0, 1\]'),
    ({'distributed.mode': 'explicit'}, r'config\.distributed\.coordinator_address'),
    ({'mesh.tensor': 3}, r'config\.mesh\.fsdp\*tensor=1\*3 does not divide the 8 devices'),
    ({'mesh.data': 3}, r'config\.mesh data\*fsdp\*tensor=3\*1\*1=3 does not equal the 8'),
    ({'mesh.fsdp': 0}, r'config\.mesh\.fsdp=0 must be >= 1'),
    ({'train.batch_size': 12}, r'config\.train\.batch_size=12 is not divisible by mesh '
                               r'data\*fsdp=8\*1=8'),
]

# A resumed run with a key that changes its math: (overrides, the key named).
# (overrides, the refusal's detail, its fix): only keys that change no shape, data or
# artifact may be suggested for --allow_config_change; the others need a new run.
_NEW_RUN = r'new --workdir.*--config\.train\.init_from_run='
BAD_RESUMES = [
    ({'train.steps': 20}, 'train.steps: 4 in the run, 20 now',
     '--allow_config_change=train.steps'),
    ({'train.batch_size': 16}, 'train.batch_size: 8 in the run, 16 now', _NEW_RUN),
    ({'model.num_layers': 2}, 'model.num_layers: 1 in the run, 2 now', _NEW_RUN),
    ({'train.warmup_steps': 1}, 'train.warmup_steps: 2 in the run, 1 now',
     '--allow_config_change=train.warmup_steps'),
    ({'fgram.size': 1000}, 'fgram.size: 2000 in the run, 1000 now', _NEW_RUN),
]


def _tree(path) -> dict:
  """Every file and folder under path with size and mtime: 'nothing written' compares it."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _train_main(values: dict, workdir: str, allow=()):
  """What `python -m scone_jax.train` does after parsing flags, in-process (fast)."""
  cfg = config_lib.from_configdict(values)
  return loop.train(cfg, workdir, allow)


@pytest.mark.parametrize('overrides,message', BAD_VALUES,
                         ids=[','.join(o) for o, _ in BAD_VALUES])
def test_bad_value_fails_before_anything_is_written(tmp_path, overrides, message):
  corpus = str(tmp_path / 'corpus')  # Never created: nothing may read it either.
  art = str(tmp_path / 'artifacts')
  workdir = str(tmp_path / 'run')
  values = th.micro_dict(corpus, art, **overrides)
  start = time.perf_counter()
  with pytest.raises(ConfigError, match=message):
    _train_main(values, workdir)
  assert time.perf_counter() - start < 5.0
  assert sorted(os.listdir(tmp_path)) == []  # No workdir, no artifacts, no corpus read.


@pytest.mark.parametrize('overrides,message,fix', BAD_RESUMES,
                         ids=[','.join(o) for o, _, _ in BAD_RESUMES])
def test_resume_with_changed_math_fails_naming_the_key(tmp_path, overrides, message, fix):
  corpus, art = str(tmp_path / 'corpus'), str(tmp_path / 'artifacts')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  # An existing run: its config.json (what resume compares against) and a checkpoint dir.
  (workdir / 'config.json').write_text(config_lib.from_configdict(
      th.micro_dict(corpus, art)).to_json())
  (workdir / 'checkpoints' / '2').mkdir(parents=True)
  before = _tree(tmp_path)
  start = time.perf_counter()
  with pytest.raises(ConfigError, match=rf'incompatible config \({message}\).*{fix}') as e:
    _train_main(th.micro_dict(corpus, art, **overrides), str(workdir))
  if fix == _NEW_RUN:
    assert '--allow_config_change' not in str(e.value)
  assert time.perf_counter() - start < 5.0
  assert _tree(tmp_path) == before


def test_resume_rules_live_beside_the_schema():
  run = config_lib.Config()
  run_values = json.loads(run.to_json())
  more_steps = config_lib.replace(run, **{'train.steps': 400})
  with pytest.raises(ConfigError, match=r'train\.steps: 200 in the run, 400 now'):
    config_runtime.check_resume(run_values, more_steps, 'W')
  # An explicit override, by key or by section, allows it and reports it.
  assert config_runtime.check_resume(run_values, more_steps, 'W', ('train.steps',)) == [
      'train.steps']
  assert config_runtime.check_resume(run_values, more_steps, 'W', ('train',)) == ['train.steps']
  # Logging, checkpointing, mesh and serving keys may always change.
  relaxed = config_lib.replace(run, **{'train.log_every': 5, 'checkpoint.keep': 9,
                                       'mesh.fsdp': 2, 'serve.temperature': 0.7})
  assert config_runtime.check_resume(run_values, relaxed, 'W') == [
      'checkpoint.keep', 'mesh.fsdp', 'serve.temperature', 'train.log_every']
  with pytest.raises(ConfigError, match='allow_config_change=train.stepz: no such'):
    config_runtime.check_resume(run_values, more_steps, 'W', ('train.stepz',))


def test_cli_rejects_a_bad_value_and_prints_the_config(tmp_path):
  config_file = th.micro_config_file(str(tmp_path / 'micro.py'), str(tmp_path / 'corpus'),
                                     str(tmp_path / 'artifacts'))
  workdir = tmp_path / 'run'
  base = [sys.executable, '-m', 'scone_jax.train', f'--config={config_file}']
  env = th.subprocess_env(1)
  done = subprocess.run(base + [f'--workdir={workdir}', '--config.train.learning_rate=-1.0'],
                        env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
  assert done.returncode != 0
  assert 'config.train.learning_rate=-1.0 must be > 0' in done.stderr
  assert 'Traceback' not in done.stderr  # One clear message.
  printed = subprocess.run(base + ['--print_config', '--config.model.family=olmo'], env=env,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
  assert printed.returncode == 0, printed.stderr[-2000:]
  resolved = json.loads(printed.stdout)
  assert resolved['model']['norm'] == 'nonparametric'  # The family default, resolved.
  assert resolved['train']['batch_size'] == 8
  assert sorted(os.listdir(tmp_path)) == ['micro.py']


# ---------------------------------------------------------------- token ids vs vocabulary


def _write_raw_shards(directory, docs, record_max: bool):
  tokens = np.concatenate(docs).astype(np.uint16)
  with artifacts.atomic_dir(directory) as tmp:
    tokens.tofile(os.path.join(tmp, shards_lib.TOKENS_FILE))
    np.save(os.path.join(tmp, shards_lib.OFFSETS_FILE),
            np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    meta = dict(num_docs=len(docs), num_tokens=int(tokens.size), num_bytes=100,
                dtype='uint16', tokenizer_fingerprint='t', fingerprint='f')
    if record_max:
      meta['max_token_id'] = int(tokens.max())
    artifacts.write_manifest(tmp, shards_lib.KIND, meta)


@pytest.mark.parametrize('record_max', [True, False], ids=['manifest', 'scan'])
def test_token_id_past_the_vocabulary_is_refused_on_open(tmp_path, record_max):
  good, bad = str(tmp_path / 'good'), str(tmp_path / 'bad')
  _write_raw_shards(good, [np.array([1, 2, 511]), np.array([7, 8])], record_max)
  _write_raw_shards(bad, [np.array([1, 2, 3]), np.array([7, 600, 8])], record_max)
  assert shards_lib.TokenShards.open(good, vocab_size=512).max_token_id() == 511
  with pytest.raises(artifacts.ArtifactError, match=r'hold token id 600, but the vocabulary '
                     r'has 512 ids'):
    shards_lib.TokenShards.open(bad, vocab_size=512)
  shards_lib.TokenShards.open(bad, vocab_size=601)  # A larger vocabulary holds it.


def test_prepared_shards_record_their_max_id(tmp_path_factory):
  corpus, art = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  prepared = prepare_lib.prepare(th.micro_config(corpus, art), str(tmp_path_factory.mktemp('w')))
  for shards in [prepared.train_shards, *prepared.eval_shards.values()]:
    assert shards.manifest['max_token_id'] == int(np.asarray(shards.tokens).max())
    assert shards.manifest['max_token_id'] < prepared.tokenizer.vocab_size


# ---------------------------------------------------------------- checkpoints


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, tmp_path_factory,
                                                              caplog):
  cfg, ref = th.reference_run(str(tmp_path_factory.getbasetemp()))
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref, workdir)
  data_files = glob.glob(os.path.join(workdir, 'checkpoints', '4', 'state', 'ocdbt.process_0',
                                      'd', '*'))
  assert data_files
  for path in data_files:  # Truncated, as by a full disk or a killed copy.
    os.truncate(path, os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING):
    result = loop.train(cfg, workdir)
  assert (result.status, result.resumed_from, result.step) == ('completed', 2, 4)
  warnings = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'checkpoint step 4' in warnings and 'falling back to step 2' in warnings
  assert 'resumed from step 2 instead of the corrupt latest step 4' in warnings
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert sorted(n for n in names if n.isdigit()) == ['2', '4']
  assert any(n.startswith('4.corrupt-') for n in names)  # Kept aside for inspection.
  got, want = th.checkpoint_arrays(workdir, 4), th.checkpoint_arrays(ref, 4)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # Retrained bitwise.


def test_failed_async_save_stops_training_with_one_message(tmp_path, tmp_path_factory,
                                                           monkeypatch):
  from orbax.checkpoint._src.path import atomicity
  corpus, art = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, art)  # The reference run's config: its compile is cached.
  threads = []

  async def disk_full(self, *args, **kwargs):
    import threading
    threads.append(threading.current_thread().name)
    raise OSError(errno.ENOSPC, 'No space left on device')
  # The rename that commits a step runs in orbax's background save thread.
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full)
  workdir = str(tmp_path / 'run')
  with pytest.raises(checkpoint_lib.CheckpointSaveError,
                     match=r'saving checkpoint step 2 to .*checkpoints failed \(OSError: '
                     r'\[Errno 28\] No space left on device\)\. Training stopped'):
    loop.train(cfg, workdir)
  assert threads and threads[0] != 'MainThread'  # The asynchronous path was tested.
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert max(steps) < 4  # Stopped before the next save was due.
  assert not any(n.isdigit() for n in os.listdir(os.path.join(workdir, 'checkpoints')))


# ---------------------------------------------------------------- one writer per run


def test_second_train_on_a_locked_run_stops_at_once_naming_the_holder(tmp_path):
  corpus, art = str(tmp_path / 'corpus'), str(tmp_path / 'artifacts')
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with runlock.RunLock(workdir):  # This process holds it, alive.
    start = time.perf_counter()
    with pytest.raises(runlock.RunLockedError, match=rf'{workdir} is being written by pid '
                       rf'{os.getpid()} on host {socket.gethostname()}'):
      _train_main(th.micro_dict(corpus, art), workdir)
    assert time.perf_counter() - start < 5.0
    assert sorted(os.listdir(workdir)) == [runlock.LOCK_FILE]  # Nothing else written.
  assert os.listdir(workdir) == []  # Released.


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (tmp_path / runlock.LOCK_FILE).write_text(json.dumps(
      {'pid': dead.pid, 'host': socket.gethostname(), 'started': 'then'}))
  with caplog.at_level(logging.WARNING):
    with runlock.RunLock(str(tmp_path)):
      assert runlock.read_lock(str(tmp_path))['pid'] == os.getpid()
  assert f'taking over from pid {dead.pid}' in caplog.text
  # Another host's lock is trusted while its heartbeat is fresh, taken over when stale.
  lock = tmp_path / runlock.LOCK_FILE
  lock.write_text(json.dumps({'pid': 1, 'host': 'elsewhere', 'started': 'then'}))
  with pytest.raises(runlock.RunLockedError, match='pid 1 on host elsewhere'):
    runlock.RunLock(str(tmp_path)).acquire()
  old = time.time() - runlock.STALE_SECONDS - 10
  os.utime(lock, (old, old))
  with runlock.RunLock(str(tmp_path)):
    pass


@pytest.mark.slow  # ~25 s of CPU: a real train CLI; the lock logic has fast tests above.
def test_two_train_processes_on_one_run(tmp_path, tmp_path_factory):
  """The second CLI train stops at once naming the first; the first's log stays quiet."""
  corpus, art = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  config_file = th.micro_config_file(str(tmp_path / 'micro.py'), corpus, art,
                                     **{'train.steps': 100000})
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'scone_jax.train', f'--config={config_file}',
         f'--workdir={workdir}']
  env = th.subprocess_env(1)
  first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while runlock.read_lock(str(workdir)) is None:
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline, 'the first train took no lock within 120 s'
      time.sleep(0.05)
    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode != 0
    assert (f'is being written by pid {first.pid} on host {socket.gethostname()}'
            in second.stderr), second.stderr[-3000:]
    assert 'Traceback' not in second.stderr
    assert first.poll() is None  # The holder is untouched.
    # Once it trains (the SIGTERM handler is in place), stop it: it saves and exits.
    metrics = workdir / 'metrics.jsonl'  # Created at start; a line once step 1 ran.
    while not (metrics.exists() and metrics.read_text().strip()):
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline + 120, 'the first train logged no step'
      time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, log = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  # Preempted: saved, not finished; the distinct status tells a scheduler to requeue.
  assert first.returncode == loop.EXIT_PREEMPTED == 75, log[-3000:]
  assert 'loop.py' in log and 'train: preempted' in log
  # Quiet: no orbax INFO lines (a save logs dozens) and no TPU probe line.
  assert 'checkpoint_manager.py' not in log and 'xla_bridge.py' not in log, log[-3000:]
  assert runlock.read_lock(str(workdir)) is None  # Released on exit.


def test_quiet_filter_and_eval_lines():
  from scone_jax import evaluate as evaluate_lib
  from scone_jax import logs

  def record(name, level, path):
    return logging.LogRecord(name, level, path, 1, 'msg', None, None)
  f = logs.ThirdPartyInfoFilter()
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not f.filter(record('absl', logging.INFO, orbax))
  assert f.filter(record('absl', logging.WARNING, orbax))  # Warnings and errors pass.
  assert f.filter(record('absl', logging.ERROR, orbax))
  assert not f.filter(record('jax._src.xla_bridge', logging.INFO, '/jax/_src/xla_bridge.py'))
  assert f.filter(record('absl', logging.INFO, '/repo/scone_jax/train/loop.py'))
  lines = evaluate_lib.format_eval({'step': 4, 'corpora': {'heldout': dict(
      loss=2.0, perplexity=7.389, bits_per_byte=0.8, tokens=512.0,
      fraction_evaluated=0.0625)}})
  assert lines == ['eval step 4 heldout (test): loss 2.0000  ppl 7.39  bits/byte 0.8000  '
                   '(512 tokens = 6.2% of the set)']


# ---------------------------------------------------------------- temporaries


def test_temporaries_of_a_killed_stage_are_cleaned_at_the_next_start(tmp_path_factory,
                                                                     tmp_path):
  corpus, art = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, art)
  prepare_lib.prepare(cfg, str(tmp_path / 'w'))
  # A stage killed inside atomic_dir (and inside write_json_atomic) leaves its temporaries.
  target = os.path.join(art, 'tokens', 'train')
  killed = subprocess.run(
      [sys.executable, '-c',
       'import os, sys\nfrom scone_jax import artifacts\n'
       'with artifacts.atomic_dir(sys.argv[1]) as tmp:\n'
       '  open(os.path.join(tmp, "tokens.bin"), "wb").write(b"x" * 100)\n'
       '  os._exit(9)\n', target], env=th.subprocess_env(1), cwd=REPO)
  assert killed.returncode == 9
  left = glob.glob(os.path.join(art, 'tokens', '.train.tmp-*'))
  assert len(left) == 1 and f'{killed.args}' and '@' in left[0]
  # A live writer's temporary, and one of unknown owner (fresh / a day old).
  live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    live_tmp = os.path.join(art, f'.x.tmp-{live.pid}@{socket.gethostname()}-abcd1234')
    os.makedirs(live_tmp)
    fresh, old = os.path.join(art, '.tmp-q1w2e3r4'), os.path.join(art, '.tmp-z9y8x7w6')
    for p in (fresh, old):
      open(p, 'w').close()
    then = time.time() - artifacts.UNKNOWN_OWNER_STALE_SECONDS - 60
    os.utime(old, (then, then))
    prepare_lib.prepare(cfg, str(tmp_path / 'w'))  # The next start.
    assert not os.path.exists(left[0]) and not os.path.exists(old)
    assert os.path.exists(live_tmp) and os.path.exists(fresh)
  finally:
    live.kill()
    live.wait()
    shutil.rmtree(live_tmp, ignore_errors=True)
    os.remove(fresh)
