"""Downstream scoring in 2 processes (gloo collectives on CPU, 2 devices each) equals one
process: process 0 reads the tasks, plans and broadcasts the batches and alone writes
W/downstream.json. The one-process test of the broadcast protocol is in
tests/test_downstream_scoring.py."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import test_downstream_runner as runner_tests
import train_helpers as th
from scone_jax import paths
from scone_jax.downstream import runner

compile_cache = th.compile_cache
run_dir = runner_tests.run_dir
TASKS = ['arc_easy', 'piqa']

# Each process: both paths through runner.run (what python -m scone_jax.downstream runs),
# then the raw log-likelihoods of arc_easy's requests, which downstream.json does not hold.
SCRIPT = '''
import sys
import numpy as np
from scone_jax.downstream import runner
workdir, task_dir, port, pid, out = sys.argv[1:]
dist = {'distributed.mode': 'explicit', 'distributed.num_processes': 2,
        'distributed.coordinator_address': '127.0.0.1:' + port,
        'distributed.process_id': int(pid)}
for path in ('train', 'store'):
  record = runner.run(workdir, %r, task_dir, path, overrides=dist)
  assert (record is None) == (pid != '0')
  run_dir, cfg, tok = runner.open_run(workdir, path, dist)
  (task,) = runner.prepare_tasks(task_dir, ['arc_easy'], 'olmo', tok, cfg.model.max_seq_len)
  scorer, _ = runner.make_scorer(run_dir, cfg, tok, path)
  if pid == '0':
    with scorer.driving():
      np.save(f'{out}/{path}.npy', scorer(task.encoded.seqs)[0])
  else:
    scorer.serve()
''' % (TASKS,)


@pytest.mark.slow  # Two JAX processes restoring and compiling both paths twice: ~2 min.
def test_two_processes_write_the_one_process_results(run_dir, tmp_path):
  cfg, workdir = run_dir
  task_dir = runner_tests._task_dir(cfg, tmp_path / 'tasks')  # pylint: disable=protected-access
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  for copy in (one, two):
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(runner.RESULTS_FILE))
  want_ll = {}
  for path in ('train', 'store'):
    want = runner.run(one, TASKS, task_dir, path, log=lambda _: None)
    run, cfg1, tok = runner.open_run(one, path)
    (task,) = runner.prepare_tasks(task_dir, ['arc_easy'], 'olmo', tok,
                                   cfg1.model.max_seq_len)
    want_ll[path] = runner.make_scorer(run, cfg1, tok, path)[0](task.encoded.seqs)[0]

  port = th.free_port()
  procs = [subprocess.Popen([sys.executable, '-c', SCRIPT, two, task_dir, str(port), str(i),
                             str(tmp_path)], env=th.subprocess_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  th.wait_all(procs, timeout=900)

  got = json.loads(paths.read_text(os.path.join(two, runner.RESULTS_FILE)))
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # Nothing half-written left.
  for path in ('train', 'store'):
    np.testing.assert_allclose(np.load(tmp_path / f'{path}.npy'), want_ll[path], rtol=1e-6)
    for task in TASKS:
      a, b = got['paths'][path]['tasks'][task], want['paths'][path]['tasks'][task]
      for key in ('metric', 'value', 'stderr', 'n', 'chance', 'variants', 'truncated',
                  'requests', 'tokens', 'task_sha256'):
        assert a[key] == b[key], (path, task, key)
