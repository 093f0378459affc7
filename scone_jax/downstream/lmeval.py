"""lm-evaluation-harness as a driver: a TemplateLM over the downstream scorer, and a launcher.

  pip install -r requirements-eval.txt
  python -m scone_jax.downstream.lmeval --workdir=W --tasks=piqa,arc_easy --task_dir=D \\
      [--path=train|store]

`SconeHarnessLM` scores lm-eval's requests with `scoring.Scorer` (either path): the same
tokenization split (lm-eval's own `_encode_pair`), BOS before every sequence, the same
left truncation to the model's window, the same packed on-device sums as the native runner.
`loglikelihood_rolling` scores a text whole as evaluate.py scores a held-out document
([BOS] + tokens in chunks of train.seq_len). Generation (`generate_until`) is not served
here: use `python -m scone_jax.generate`.

The launcher writes one lm-eval task YAML per task file (`dataset_path: json`,
`data_files` the local JSONL, the olmo preset's zero-shot template as `doc_to_text`,
" " as the target delimiter) and runs `simple_evaluate` offline (HF_DATASETS_OFFLINE=1):
lm-eval's `acc` is the native `acc_raw` and its `acc_norm` (log-likelihood over the
choice's characters) the native `acc_per_char`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np
from absl import flags
from lm_eval import evaluator
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

from scone_jax import cli, paths
from scone_jax.downstream import presets, runner, scoring
from scone_jax.errors import UserError

TASK_PREFIX = 'scone_'


class SconeHarnessLM(TemplateLM):
  """lm-eval's model interface over a downstream `Scorer` and the run's tokenizer."""

  def __init__(self, scorer: scoring.Scorer, tokenizer, rolling_len: int,
               truncate: bool = True):
    super().__init__()
    self._scorer, self._tok = scorer, tokenizer
    self._rolling_len, self._truncate = rolling_len, truncate

  @property
  def eot_token_id(self) -> int:
    return self._tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    # An empty context conditions on BOS alone, as every native sequence starts.
    return self._tok.bos_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # The tokenizer adds no special tokens.
    return np.asarray(self._tok.encode([string])[0]).tolist()

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    seqs = []
    for (context, _), ctx_enc, cont_enc in requests:
      if context == '':  # lm-eval conditions on [prefix_token_id]: BOS, added below.
        ctx_enc = ctx_enc[1:] if ctx_enc[:1] == [self.prefix_token_id] else ctx_enc
      seqs.append(scoring.make_seq(self._tok.bos_id, ctx_enc, cont_enc,
                                   self._scorer.window, self._truncate,
                                   f'lm-eval request {context[:40]!r}')[0])
    ll_N, greedy_N = self._scorer(seqs)
    return [(float(ll), bool(g)) for ll, g in zip(ll_N, greedy_N)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    texts = [req.args[0] for req in requests]
    return scoring.rolling_loglikelihoods(
        self._scorer, [np.asarray(t) for t in self._tok.encode(texts)], self._tok.bos_id,
        self._rolling_len)

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    raise UserError('generation tasks are not served by this adapter; score multiple-'
                    'choice and perplexity tasks here and generate with python -m '
                    'scone_jax.generate')


def task_yaml(name: str, data_file: str) -> str:
  """An lm-eval task over a local task file with the olmo preset's zero-shot template."""
  presets.check_task(name)
  text = ('Question: {{context}}\\nAnswer:' if presets.TEMPLATES[name] == presets.QA
          else '{{context}}')
  return '\n'.join([
      f'task: {TASK_PREFIX}{name}', 'dataset_path: json', 'dataset_kwargs:',
      '  data_files:', f'    test: {data_file}', 'test_split: test',
      'output_type: multiple_choice', f'doc_to_text: "{text}"',
      'doc_to_choice: choices', 'doc_to_target: gold',
      f'target_delimiter: "{presets.DELIMITER}"', 'metric_list:',
      '  - metric: acc', '    aggregation: mean', '    higher_is_better: true',
      '  - metric: acc_norm', '    aggregation: mean', '    higher_is_better: true', ''])


def evaluate_tasks(lm: SconeHarnessLM, task_dir: str, names: Sequence[str],
                   yaml_dir: str) -> dict[str, dict[str, float]]:
  """Runs simple_evaluate offline on YAMLs written to yaml_dir; {task: {acc, acc_norm,
  acc_stderr, acc_norm_stderr}}."""
  os.environ['HF_DATASETS_OFFLINE'] = '1'
  os.makedirs(yaml_dir, exist_ok=True)
  for name in names:
    data_file = runner.task_file(task_dir, name)
    if paths.is_remote(data_file) or not os.path.isfile(data_file):
      raise UserError(f'lm-eval reads local task files: {data_file} is not one; copy the '
                      'task files to a local --task_dir')
    with open(os.path.join(yaml_dir, f'{TASK_PREFIX}{name}.yaml'), 'w') as f:
      f.write(task_yaml(name, os.path.abspath(data_file)))
  out = evaluator.simple_evaluate(
      model=lm, tasks=[TASK_PREFIX + n for n in names],
      task_manager=TaskManager(include_path=yaml_dir), log_samples=False)
  results = {}
  for name in names:
    r = out['results'][TASK_PREFIX + name]
    # Keys look like 'acc,none' / 'acc_stderr,none' (metric, filter).
    results[name] = {k.split(',')[0]: float(v) for k, v in r.items()
                     if k.split(',')[0] in ('acc', 'acc_norm', 'acc_stderr',
                                            'acc_norm_stderr')}
  return results


FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_TASKS = flags.DEFINE_list('tasks', None, f'Tasks from {list(presets.TASKS)}.', required=True,
                           flag_values=FLAGS)
_TASK_DIR = flags.DEFINE_string('task_dir', None, 'Local directory of <task>.jsonl files.',
                                required=True, flag_values=FLAGS)
_PATH = flags.DEFINE_enum('path', 'train', list(runner.PATHS), 'Scoring path.',
                          flag_values=FLAGS)
_YAML_DIR = flags.DEFINE_string('yaml_dir', '', 'Where to keep the task YAMLs (default: a '
                                'temporary directory).', flag_values=FLAGS)


def main(argv):
  del argv
  run_dir, cfg, tok = runner.open_run(_WORKDIR.value, _PATH.value)
  scorer, _ = runner.make_scorer(run_dir, cfg, tok, _PATH.value)
  lm = SconeHarnessLM(scorer, tok, cfg.train.seq_len)
  with tempfile.TemporaryDirectory() as tmp:
    results = evaluate_tasks(lm, _TASK_DIR.value, _TASKS.value, _YAML_DIR.value or tmp)
  for name, r in results.items():
    print(f'lm-eval {_PATH.value} {name}: ' + '  '.join(f'{k} {v:.4f}' for k, v in sorted(
        r.items())))


if __name__ == '__main__':
  cli.run('downstream.lmeval', main, FLAGS)
