"""python -m scone_jax.downstream on a trained micro run: both paths, resume, bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th
from gcs_emulator import gcs  # noqa: F401  (the fixture)
from scone_jax import config as config_lib
from scone_jax import evaluate as evaluate_lib
from scone_jax import mesh as mesh_lib
from scone_jax import generate as generate_lib
from scone_jax import paths
from scone_jax import restore
from scone_jax import run as run_lib
from scone_jax.downstream import runner, scoring
from scone_jax.downstream.tasks import Doc, TaskFileError, read_tasks, write_tasks
from scone_jax.export import export_store
from scone_jax.serve import session

compile_cache = th.compile_cache
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A copy of the shared micro reference run (SCONE, window 32) with a float32 export."""
  cfg, reference = th.reference_run(str(tmp_path_factory.getbasetemp()))
  workdir = str(tmp_path_factory.mktemp('downstream') / 'run')
  shutil.copytree(reference, workdir)
  export_store(config_lib.replace(cfg, **{'export.dtype': 'float32'}), workdir,
               progress=False)
  return cfg, workdir


def _task_dir(cfg, directory):
  """Two tasks from the micro corpus's held-out lines: pick the true next words among
  words of other lines; one long context exceeds the window of 32 tokens."""
  corpus = os.path.dirname(cfg.data.train_files)
  lines = [ln.split() for ln in open(os.path.join(corpus, 'eval.txt')).read().splitlines()]
  lines = [ln for ln in lines if len(ln) >= 8]
  rng = np.random.default_rng(0)
  docs = []
  for i, words in enumerate(lines[:12]):
    others = [' '.join(lines[(i + k) % len(lines)][4:7]) for k in (1, 2, 3)]
    gold = int(rng.integers(4))
    choices = others[:gold] + [' '.join(words[4:7])] + others[gold:]
    docs.append(Doc(str(i), ' '.join(words[:4]), tuple(choices), gold))
  long_words = sum(lines[:8], [])[:60]
  docs.append(Doc('long', ' '.join(long_words), ('w1 w2', 'the of'), 0))
  write_tasks(os.path.join(directory, 'arc_easy.jsonl'), docs)
  write_tasks(os.path.join(directory, 'piqa.jsonl'), docs[3:9])
  return str(directory)


def test_both_paths_agree_resume_and_record(run_dir, tmp_path):
  cfg, workdir = run_dir
  task_dir = _task_dir(cfg, tmp_path / 'tasks')
  with pytest.raises(TaskFileError, match="unknown task 'boolq'"):
    runner.run(workdir, ['arc_easy', 'boolq'], task_dir)
  assert not os.path.exists(os.path.join(workdir, runner.RESULTS_FILE))

  lines = []
  record = runner.run(workdir, ['arc_easy', 'piqa'], task_dir, 'train', log=lines.append)
  assert json.loads(paths.read_text(os.path.join(workdir, runner.RESULTS_FILE))) == record
  train = record['paths']['train']
  assert train['step'] == cfg.train.steps and train['xla_flops_per_token'] > 0
  arc = train['tasks']['arc_easy']
  assert arc['n'] == 13 and arc['metric'] == 'acc_raw'
  # Truncated: the conditional requests whose BOS + context + continuation inputs exceed
  # the window (the long document's two at least).
  tok = run_lib.RunDir(workdir).tokenizer()
  docs = read_tasks(os.path.join(task_dir, 'arc_easy.jsonl'))
  wholes = [f'Question: {d.context}\nAnswer: {c}' for d in docs for c in d.choices]
  want = sum(len(ids) > cfg.model.max_seq_len for ids in tok.encode(wholes))
  assert arc['truncated'] == want >= 2
  assert arc['value'] == arc['variants']['acc_raw']['value']
  assert set(arc['variants']) == {'acc_raw', 'acc_per_token', 'acc_per_char',
                                  'acc_per_byte', 'acc_pmi'}
  assert arc['chance'] == pytest.approx((12 * 0.25 + 0.5) / 13)
  assert len(lines) == 2 and lines[0].startswith('downstream train arc_easy (olmo): acc_raw')

  record = runner.run(workdir, ['arc_easy', 'piqa'], task_dir, 'store')
  store = record['paths']['store']
  assert record['paths']['train'] == train  # The other path's results stay.
  for task in ('arc_easy', 'piqa'):
    for variant, v in train['tasks'][task]['variants'].items():
      assert store['tasks'][task]['variants'][variant] == v, (task, variant)
  assert store['xla_flops_per_token'] < train['xla_flops_per_token']

  # Resume: unchanged tasks are not scored again; a changed task file is.
  lines.clear()
  runner.run(workdir, ['arc_easy', 'piqa'], task_dir, 'train', log=lines.append)
  assert all(ln.endswith('[resumed]') for ln in lines) and len(lines) == 2
  write_tasks(os.path.join(task_dir, 'piqa.jsonl'), [Doc('x', 'the of', ('and', 'w3'), 1)])
  lines.clear()
  record = runner.run(workdir, ['arc_easy', 'piqa'], task_dir, 'train', log=lines.append)
  assert lines[0].endswith('[resumed]') and not lines[1].endswith('[resumed]')
  assert record['paths']['train']['tasks']['piqa']['n'] == 1


def test_store_log_likelihoods_equal_the_train_paths_on_a_trained_run(run_dir, tmp_path):
  """Within 1e-5 on the float32 export, every request (contexts, PMI's unconditional
  ones, left-truncated ones) of a task."""
  cfg, workdir = run_dir
  task_dir = _task_dir(cfg, tmp_path / 'tasks')
  rd = run_lib.RunDir(workdir)
  tok = rd.tokenizer()
  (task,) = runner.prepare_tasks(task_dir, ['arc_easy'], 'olmo', tok, cfg.model.max_seq_len)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  lm, step = rd.restore_model(cfg, mesh)
  table = rd.table(cfg.fgram)
  store = session.open_checked_store(cfg, workdir, step, table, tok,
                                     lambda: run_lib.weights_fingerprint(lm))
  kw = dict(window=cfg.model.max_seq_len, rows_per_batch=8, table=table)
  train, _ = scoring.Scorer(lm, mesh, **kw)(task.encoded.seqs)
  got, _ = scoring.Scorer(lm, mesh, store=store, stored_rule=cfg.fgram_model.stored_rule,
                          **kw)(task.encoded.seqs)
  np.testing.assert_allclose(got, train, rtol=1e-5, atol=1e-5 * np.abs(train).max())
  assert store.stats.hits > 50  # F-grams matched and were served from the store.


def test_bad_inputs_fail_before_scoring(run_dir, tmp_path):
  cfg, workdir = run_dir
  task_dir = _task_dir(cfg, tmp_path / 'tasks')
  results = os.path.join(workdir, runner.RESULTS_FILE)
  before = open(results).read() if os.path.exists(results) else None
  with pytest.raises(TaskFileError, match="unknown preset 'olmo3'"):
    runner.run(workdir, ['piqa'], task_dir, preset='olmo3')
  with pytest.raises(TaskFileError, match='exceed the model\'s window of 32'):
    runner.run(workdir, ['arc_easy'], task_dir, truncate=False)
  with pytest.raises(TaskFileError, match=r'piqa.dev.jsonl does not exist'):
    runner.run(workdir, ['piqa'], task_dir, preset='olmes')
  (tmp_path / 'tasks' / 'piqa.jsonl').write_bytes(
      b'{"id": 1, "context": "a", "choices": ["b"], "gold": 0}\n')
  with pytest.raises(TaskFileError, match=r'piqa.jsonl:1: 1 choice'):
    runner.run(workdir, ['arc_easy', 'piqa'], task_dir)
  assert (open(results).read() if os.path.exists(results) else None) == before


@pytest.mark.slow  # A Python subprocess importing JAX: ~30 s on a loaded machine.
def test_cli_prints_a_bad_input_as_one_line_and_exits_2(run_dir, tmp_path):
  cfg, workdir = run_dir
  task_dir = _task_dir(cfg, tmp_path / 'tasks')
  (tmp_path / 'tasks' / 'piqa.jsonl').write_bytes(
      b'{"id": 1, "context": "a", "choices": ["b"], "gold": 0}\n')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-m', 'scone_jax.downstream', f'--workdir={workdir}',
                        '--tasks=piqa', f'--task_dir={task_dir}'], capture_output=True,
                       text=True, env=env, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'piqa.jsonl:1: 1 choice(s)' in out.stderr.strip().splitlines()[-1]


def _scorer(cfg, workdir, path='train'):
  run_dir, cfg, tok = runner.open_run(workdir, path)
  scorer, _ = runner.make_scorer(run_dir, cfg, tok, path)
  return scorer, tok


@pytest.mark.slow  # evaluate.py over the whole held-out set, then the scorer: ~35 s.
def test_rolling_log_likelihood_equals_evaluates_nll(run_dir):
  """Whole documents scored with evaluate.py's chunking give its held-out loss."""
  cfg, workdir = run_dir
  want = evaluate_lib.evaluate(workdir, eval_batches=0)['corpora']['heldout']
  scorer, tok = _scorer(cfg, workdir)
  shards = run_lib.RunDir(workdir).eval_shards()['heldout']
  ll = scoring.rolling_loglikelihoods(scorer, list(shards), tok.bos_id,
                                       cfg.train.seq_len)
  assert want['fraction_evaluated'] == 1.0
  assert -sum(ll) / shards.num_tokens == pytest.approx(want['loss'], rel=1e-5)


def test_lm_eval_adapter_equals_the_native_runner(run_dir, tmp_path):
  pytest.importorskip('lm_eval')
  from scone_jax.downstream import lmeval
  cfg, workdir = run_dir
  task_dir = _task_dir(cfg, tmp_path / 'tasks')
  native = runner.run(workdir, ['arc_easy', 'piqa'], task_dir, 'train')
  scorer, tok = _scorer(cfg, workdir)
  lm = lmeval.SconeHarnessLM(scorer, tok, cfg.train.seq_len)
  got = lmeval.evaluate_tasks(lm, task_dir, ['arc_easy', 'piqa'], str(tmp_path / 'yaml'))
  for task in ('arc_easy', 'piqa'):
    variants = native['paths']['train']['tasks'][task]['variants']
    assert got[task]['acc'] == pytest.approx(variants['acc_raw']['value'], abs=1e-12)
    assert got[task]['acc_norm'] == pytest.approx(variants['acc_per_char']['value'],
                                                  abs=1e-12)
    assert got[task]['acc_stderr'] == pytest.approx(variants['acc_raw']['stderr'], rel=1e-9)
  texts = ['the of and to in is that', 'w1 ' * 40]
  rolling = lm.loglikelihood_rolling([type('R', (), {'args': (t,)})() for t in texts])
  want = scoring.rolling_loglikelihoods(scorer, [np.asarray(x) for x in tok.encode(texts)],
                                        tok.bos_id, cfg.train.seq_len)
  assert rolling == want and len(scoring.rolling_seqs(tok.encode(texts)[1], 1,
                                                      cfg.train.seq_len)) >= 2


PROMPTS = ['the of and', 'w1 w2', 'to in is that the of']


def _generate_until_equals_generate(workdir):
  """The adapter's generate_until (decoder batches of 2: prompts of different lengths
  padded together) against `python -m scone_jax.generate`'s greedy texts of the same
  prompts (one batch of 3), an `until` string cutting the first inside its text."""
  pytest.importorskip('lm_eval')
  from lm_eval.api.instance import Instance
  from scone_jax.downstream import lmeval
  serve_cfg = restore.run_config(workdir, {'serve.temperature': 0.0, 'serve.batch_size': 2,
                                           'serve.max_new_tokens': 12})
  texts = generate_lib.generate(serve_cfg, workdir, PROMPTS).texts
  assert all(t.startswith(p) for p, t in zip(PROMPTS, texts))
  want = [t[len(p):] for p, t in zip(PROMPTS, texts)]
  stop = want[0].split()[1]
  tok = run_lib.RunDir(workdir).tokenizer()
  lm = lmeval.SconeHarnessLM(None, tok, serve_cfg.train.seq_len,
                             decoder=lambda: session.build_decoder(serve_cfg, workdir)[1])

  def request(prompt, **kw):
    return Instance('generate_until', {}, (prompt, {'max_gen_toks': 12, **kw}), 0)
  got = lm.generate_until([request(PROMPTS[0], until=[stop], do_sample=False),
                           request(PROMPTS[1], until='\n\n', temperature=0.0),
                           request(PROMPTS[2], until=[])])
  assert got[0] == want[0].split(stop)[0] and len(got[0]) < len(want[0])
  assert got[1:] == [want[1].split('\n\n')[0], want[2]]
  with pytest.raises(lmeval.GenerationSettingsError, match='no room for a context'):
    lm.generate_until([request(PROMPTS[0], max_gen_toks=40)])
  return lmeval


def test_generate_until_equals_generates_greedy_text_scone(run_dir):
  """Through the f-gram store of the run's float32 export."""
  lmeval = _generate_until_equals_generate(run_dir[1])
  assert lmeval.greedy_settings({'until': 'Q:', 'temperature': 0}) == (['Q:'], 256)
  with pytest.raises(lmeval.GenerationSettingsError, match='do_sample: false'):
    lmeval.greedy_settings({'do_sample': True, 'temperature': 0.7})
  with pytest.raises(lmeval.GenerationSettingsError, match='do_sample: false'):
    lmeval.greedy_settings({'temperature': 0.7})  # lm-eval samples then.
  with pytest.raises(lmeval.GenerationSettingsError, match=r"\['num_beams'\] are not"):
    lmeval.greedy_settings({'until': [], 'num_beams': 4})


@pytest.mark.slow  # Trains a baseline micro run (~40 s on a loaded machine).
def test_generate_until_equals_generates_greedy_text_baseline(tmp_path_factory):
  from scone_jax.train import loop  # pylint: disable=g-import-not-at-top
  corpus, artifacts = th.shared_dirs(str(tmp_path_factory.getbasetemp()))
  cfg = th.micro_config(corpus, artifacts, **{'fgram_model.num_layers': 0,
                                              'train.steps': 2})
  workdir = str(tmp_path_factory.mktemp('baseline') / 'run')
  loop.train(cfg, workdir)
  _generate_until_equals_generate(workdir)


def test_a_run_in_a_bucket_scores_the_same(run_dir, gcs, tmp_path):
  """Workdir (checkpoints, export) and task files in gs://: same results, written there."""
  cfg, workdir = run_dir
  task_dir = _task_dir(cfg, tmp_path / 'tasks')
  local = runner.run(workdir, ['piqa'], task_dir, 'store')['paths']['store']['tasks']
  remote = f'{gcs}/downstream/run'
  for name in paths.walk_files(workdir):
    if name != runner.RESULTS_FILE:
      with open(os.path.join(workdir, name), 'rb') as f:
        paths.write_bytes(paths.join(remote, name), f.read())
  # On GCS orbax marks a finished step with commit_success.txt (test_gcs.py says why).
  for step in os.listdir(os.path.join(workdir, 'checkpoints')):
    paths.write_bytes(f'{remote}/checkpoints/{step}/commit_success.txt', b'copied')
  remote_tasks = f'{gcs}/downstream/tasks'
  paths.write_bytes(f'{remote_tasks}/piqa.jsonl',
                    open(os.path.join(task_dir, 'piqa.jsonl'), 'rb').read())
  got = runner.run(remote, ['piqa'], remote_tasks, 'store')
  assert got['paths']['store']['tasks']['piqa']['variants'] == local['piqa']['variants']
  assert json.loads(paths.read_text(f'{remote}/{runner.RESULTS_FILE}')) == got


def test_the_tests_install_the_users_lm_eval_pins():
  """requirements-dev.txt (what `make test` installs) pins lm-eval as
  requirements-eval.txt (what users install) does, so CI tests what users get."""
  def pins(name):
    lines = open(os.path.join(REPO, name)).read().splitlines()
    return {ln.strip() for ln in lines if '==' in ln and not ln.startswith('#')}
  assert pins('requirements-eval.txt') <= pins('requirements-dev.txt')
