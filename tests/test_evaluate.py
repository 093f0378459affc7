"""Evaluation: per-corpus loss / perplexity / bits per byte against a numpy reference, the
CLI, and clear errors."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th
from train_helpers import compile_cache  # noqa: F401  (autouse fixture)
from scone_jax import batches
from scone_jax import evaluate as evaluate_lib
from scone_jax.artifacts import ArtifactError
from scone_jax.config import MeshConfig
from scone_jax.fgrams import FgramTable
from scone_jax.tokenizer import TokenShards


def test_corpus_metrics_formulas():
  r = evaluate_lib.corpus_metrics(nll_sum=300.0, tokens=100.0, corpus_tokens=1000,
                                  corpus_bytes=4000)
  assert r.loss == 3.0
  assert r.perplexity == pytest.approx(math.exp(3.0))
  # 3 nats/token * 1000 tokens / 4000 bytes / ln 2.
  assert r.bits_per_byte == pytest.approx(3.0 * 1000 / 4000 / math.log(2))
  assert r.fraction_evaluated == 0.1
  with pytest.raises(ValueError, match="eval corpus 'x' has no tokens"):
    evaluate_lib.corpus_metrics(0.0, 0.0, 10, 10, 'x')


def _numpy_eval_loss(cfg, workdir, artifacts):
  """The held-out loss recomputed outside the evaluator: numpy log-softmax over logits of
  the restored model, summed over the same eval batches."""
  import jax
  from flax import nnx
  from scone_jax.train import checkpoint as checkpoint_lib
  from scone_jax import mesh as mesh_lib
  from scone_jax.train import step as step_lib
  mesh = mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  graphdef, state, _ = step_lib.create_train_state(cfg, mesh, cfg.tokenizer.vocab_size,
                                                   cfg.fgram.max_len)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.checkpoint)
  state = ckpt.restore(ckpt.latest_step(), state)
  ckpt.close()
  model = nnx.merge(graphdef, state.params, state.other)
  shards = TokenShards.open(os.path.join(artifacts, 'tokens', 'eval-heldout'))
  table = FgramTable.load(os.path.join(artifacts, 'fgrams'))
  nll, tokens = 0.0, 0.0
  for local in batches.make_eval_iterator(cfg, shards, table,
                                          max_batches=cfg.train.eval_batches):
    inputs, _ = batches.split_stats(local)
    logits = np.asarray(model(inputs), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, inputs['targets_BxT'][..., None], -1)[..., 0]
    nll += float(((logz - target) * inputs['weights_BxT']).sum())
    tokens += float(inputs['weights_BxT'].sum())
  return nll / tokens, shards


def test_eval_json_matches_numpy_reference(tmp_path_factory):
  base = str(tmp_path_factory.getbasetemp())
  cfg, workdir = th.reference_run(base)
  _, artifacts = th.shared_dirs(base)
  with open(os.path.join(workdir, 'eval.json')) as f:
    record = json.load(f)
  assert record['step'] == cfg.train.steps
  got = record['corpora']['heldout']
  want_loss, shards = _numpy_eval_loss(cfg, workdir, artifacts)
  assert got['loss'] == pytest.approx(want_loss, rel=1e-5)
  assert got['perplexity'] == pytest.approx(math.exp(want_loss), rel=1e-5)
  assert got['bits_per_byte'] == pytest.approx(
      want_loss * shards.num_tokens / shards.num_bytes / math.log(2), rel=1e-5)
  # The same numbers from the standalone function (restores the latest checkpoint).
  copy = str(tmp_path_factory.mktemp('eval_copy'))
  shutil.copytree(workdir, copy, dirs_exist_ok=True)
  os.remove(os.path.join(copy, 'eval.json'))
  again = evaluate_lib.evaluate(copy)
  assert again['corpora']['heldout']['loss'] == pytest.approx(got['loss'], rel=1e-6)
  with open(os.path.join(copy, 'eval.json')) as f:
    assert json.load(f) == again


def test_evaluate_errors_are_clear(tmp_path, tmp_path_factory):
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    evaluate_lib.evaluate(str(tmp_path))
  base = str(tmp_path_factory.getbasetemp())
  cfg, workdir = th.reference_run(base)
  # A run dir with a config but no checkpoint.
  run = tmp_path / 'fresh'
  run.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), run / 'config.json')
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    evaluate_lib.evaluate(str(run))


def test_evaluate_refuses_a_table_that_is_not_the_runs(tmp_path, tmp_path_factory):
  """W/run.json pins the table's fingerprint: a re-mined table at the recorded place is
  refused, naming it, and eval.json stays as it was."""
  from scone_jax import prepare
  base = str(tmp_path_factory.getbasetemp())
  cfg, workdir = th.reference_run(base)
  corpus, _ = th.shared_dirs(base)
  # A table mined with another tokenizer (vocab 300).
  other = th.micro_config(corpus, str(tmp_path / 'other'), **{'tokenizer.vocab_size': 300})
  prepare.prepare(other, str(tmp_path))
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  record = json.load(open(os.path.join(run, 'run.json')))
  record['fgram_table']['location'] = str(tmp_path / 'other' / 'fgrams')
  json.dump(record, open(os.path.join(run, 'run.json'), 'w'))
  before = open(os.path.join(run, 'eval.json')).read()
  with pytest.raises(ArtifactError, match='fingerprint') as error:
    evaluate_lib.evaluate(run)
  assert 'fgrams' in str(error.value) and 'trained with' in str(error.value)
  assert open(os.path.join(run, 'eval.json')).read() == before


def test_cli_writes_eval_json(tmp_path, tmp_path_factory):
  base = str(tmp_path_factory.getbasetemp())
  _, workdir = th.reference_run(base)
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  full = json.load(open(os.path.join(run, 'eval.json')))['corpora']['heldout']
  os.remove(os.path.join(run, 'eval.json'))
  config_before = open(os.path.join(run, 'config.json')).read()
  env = th.subprocess_env(8)
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(base, 'xla_cache')
  # --eval_batches overrides the run's train.eval_batches (2) for this evaluation only.
  done = subprocess.run([sys.executable, '-m', 'scone_jax.evaluate', f'--workdir={run}',
                         '--eval_batches=1'],
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.load(open(os.path.join(run, 'eval.json')))
  assert record['step'] == 4 and set(record['corpora']) == {'heldout'}
  got = record['corpora']['heldout']
  assert got['tokens'] < full['tokens'] and got['fraction_evaluated'] < full['fraction_evaluated']
  assert (f'heldout (test): loss {got["loss"]:.4f}' in done.stdout
          and f'{got["fraction_evaluated"]:.1%} of the set)' in done.stdout)
  assert open(os.path.join(run, 'config.json')).read() == config_before
