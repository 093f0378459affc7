"""The embedded-corpus downstream task: a briefly trained tiny model beats chance (slow)."""

import importlib.util
import os

import pytest

import train_helpers as th
from scone_jax import config as config_lib
from scone_jax import prepare as prepare_lib
from scone_jax.downstream import embedded, runner
from scone_jax.downstream.tasks import write_tasks
from scone_jax.export import export_store
from scone_jax.train import loop

compile_cache = th.compile_cache
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**overrides):
  spec = importlib.util.spec_from_file_location(
      'tiny_experiment', os.path.join(ROOT, 'experiments', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config()
  for dotted, value in overrides.items():
    section, key = dotted.split('.')
    setattr(getattr(cd, section), key, value)
  return config_lib.from_configdict(cd)


@pytest.mark.slow  # Prepare on the stdlib corpus + 200 train steps: minutes on 2 cores.
def test_trained_tiny_model_beats_chance_on_next_sentence_through_both_paths(tmp_path):
  # A quarter of the modules held out: ~1000 scored documents, so the stderr is small.
  cfg = _tiny(**{'train.steps': 200, 'fgram_model.num_layers': 1,
                 'checkpoint.every_steps': 200, 'train.eval_every': 0,
                 'data.embedded_eval_fraction': 0.25})
  workdir = str(tmp_path / 'run')
  loop.train(cfg, workdir)
  corpus_dir = os.path.join(prepare_lib.artifacts_dir(cfg, workdir), 'corpus')
  docs = embedded.embedded_task_from_corpus(corpus_dir, num_docs=1000, num_choices=4)
  task_dir = str(tmp_path / 'tasks')
  write_tasks(os.path.join(task_dir, 'embedded.jsonl'), docs)
  export_store(config_lib.replace(cfg, **{'export.dtype': 'float32'}), workdir,
               progress=False)
  record = runner.run(workdir, ['embedded'], task_dir, 'train')
  r = record['paths']['train']['tasks']['embedded']
  assert r['chance'] == pytest.approx(0.25)
  assert r['metric'] == 'acc_pmi'
  assert r['value'] - r['chance'] > 2 * r['stderr'], r['variants']
  record = runner.run(workdir, ['embedded'], task_dir, 'store')
  assert record['paths']['store']['tasks']['embedded']['variants'] == r['variants']
