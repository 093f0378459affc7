"""lm-evaluation-harness as a driver: a TemplateLM over the downstream scorer, and a launcher.

  pip install -r requirements-eval.txt
  python -m scone_jax.downstream.lmeval --workdir=W --tasks=piqa,arc_easy --task_dir=D \\
      [--path=train|store]

`SconeHarnessLM` scores lm-eval's requests with `scoring.Scorer` (either path): the same
tokenization split (lm-eval's own `_encode_pair`), BOS before every sequence, the same
left truncation to the model's window, the same packed on-device sums as the native runner.
`loglikelihood_rolling` scores a text whole as evaluate.py scores a held-out document
([BOS] + tokens in chunks of train.seq_len). `generate_until` generates greedily through
the serving decoder (serve/session.py `build_decoder`, the path of `python -m
scone_jax.generate`: a SCONE run's f-gram rows come from its exported store whatever
--path scores, a baseline runs its plain backbone), batched serve.batch_size requests at a
time, and cuts each text at the first of its `until` strings as lm-eval's HF model does;
sampling settings are refused.

The launcher writes one lm-eval task YAML per task file (`dataset_path: json`,
`data_files` the local JSONL, the olmo preset's zero-shot template as `doc_to_text`,
" " as the target delimiter) and runs `simple_evaluate` offline (HF_DATASETS_OFFLINE=1):
lm-eval's `acc` is the native `acc_raw` and its `acc_norm` (log-likelihood over the
choice's characters) the native `acc_per_char`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Sequence

import jax
import numpy as np
from absl import flags, logging
from lm_eval import evaluator
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager

from scone_jax import cli, paths
from scone_jax.downstream import presets, runner, scoring
from scone_jax.errors import UserError
from scone_jax.serve import session
from scone_jax.serve.decode import Decoder
from scone_jax.serve.sampling import Sampling

TASK_PREFIX = 'scone_'
# lm-eval's default for a request that names no max_gen_toks (its HF model's).
MAX_GEN_TOKS = 256
# What greedy decoding honours; normalize_gen_kwargs maps max_new_tokens & co. to
# max_gen_toks and sets temperature 0 when do_sample is False.
GREEDY_KEYS = frozenset({'until', 'max_gen_toks', 'do_sample', 'temperature'})


class GenerationSettingsError(UserError):
  """A generate_until request whose settings this adapter cannot honour."""


def greedy_settings(gen_kwargs: dict, default_max_gen_toks: int = MAX_GEN_TOKS
                    ) -> tuple[list[str], int]:
  """(stop strings, max_gen_toks) of a request's generation kwargs, read as lm-eval's
  models read them (`normalize_gen_kwargs`).

  Raises:
    GenerationSettingsError: sampling (do_sample, or a temperature > 0 without
      do_sample=False), another setting than GREEDY_KEYS, or max_gen_toks < 1.
  """
  kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks)
  if kw['do_sample']:
    raise GenerationSettingsError(
        f'generation_kwargs ask for sampling (do_sample={gen_kwargs.get("do_sample")}, '
        f'temperature={gen_kwargs.get("temperature")}): this adapter generates greedily; '
        "set do_sample: false (or temperature: 0) in the task's generation_kwargs, or "
        'sample with python -m scone_jax.generate --config.serve.temperature=...')
  other = sorted(set(kw) - GREEDY_KEYS)
  if other:
    raise GenerationSettingsError(
        f'generation_kwargs {other} are not served by this adapter (greedy decoding '
        f"honours {sorted(GREEDY_KEYS)}); remove them from the task's generation_kwargs")
  if kw['max_gen_toks'] < 1:
    raise GenerationSettingsError(f'max_gen_toks={kw["max_gen_toks"]} must be >= 1')
  return [u for u in kw['until'] if isinstance(u, str)], int(kw['max_gen_toks'])


class SconeHarnessLM(TemplateLM):
  """lm-eval's model interface over a downstream `Scorer` and the run's tokenizer."""

  def __init__(self, scorer: scoring.Scorer, tokenizer, rolling_len: int,
               truncate: bool = True, decoder: Callable[[], Decoder] | None = None,
               max_gen_toks: int = MAX_GEN_TOKS):
    """
    Args:
      scorer: scores loglikelihood and loglikelihood_rolling requests.
      tokenizer: the run's tokenizer.
      rolling_len: the chunk length of loglikelihood_rolling (train.seq_len).
      truncate: cut a request's oldest context tokens to fit the window (else an error).
      decoder: builds the decoder of generate_until (called once, on the first such
        request: tasks without generation never restore a second model).
      max_gen_toks: the default of requests that name none.
    """
    super().__init__()
    self._scorer, self._tok = scorer, tokenizer
    self._rolling_len, self._truncate = rolling_len, truncate
    self._make_decoder, self._decoder = decoder, None
    self.max_gen_toks = max_gen_toks

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
    """Each request's greedy continuation (up to its max_gen_toks tokens or EOS), cut at
    the first of its `until` strings. A context that leaves fewer than max_gen_toks
    tokens of the model's window (BOS included) loses its oldest tokens, as lm-eval's HF
    model truncates (logged with the count)."""
    del disable_tqdm
    if self._make_decoder is None:
      raise UserError('generate_until needs a decoder: pass decoder=lambda: session.'
                      'build_decoder(cfg, workdir)[1] to SconeHarnessLM')
    settings = [greedy_settings(req.args[1], self.max_gen_toks) for req in requests]
    if self._decoder is None:
      self._decoder = self._make_decoder()
    window = self._decoder.cache_len
    contexts, truncated = [], 0
    for req, (_, max_gen) in zip(requests, settings):
      room = window - 1 - max_gen  # The decoder prepends BOS.
      if room < 1:
        raise GenerationSettingsError(
            f"max_gen_toks={max_gen} leaves no room for a context in the model's window "
            f"of {window} tokens (BOS included); lower max_gen_toks in the task's "
            'generation_kwargs')
      ids = self.tok_encode(req.args[0])
      if not ids:
        raise GenerationSettingsError(f'request context {req.args[0]!r} encodes to no '
                                      'tokens; generate_until needs a prompt')
      truncated += len(ids) > room
      contexts.append(np.asarray(ids[-room:], np.int32))
    if truncated:
      logging.warning('generate_until: %d of %d contexts lost their oldest tokens to fit '
                      'the window of %d tokens with max_gen_toks', truncated, len(requests),
                      window)
    # Batches of one max_gen_toks, longest contexts first (similar lengths pad least).
    order = sorted(range(len(requests)), key=lambda i: (settings[i][1], -len(contexts[i])))
    out = [''] * len(requests)
    start = 0
    while start < len(order):
      max_gen = settings[order[start]][1]
      batch = [i for i in order[start:start + self._decoder.batch_size]
               if settings[i][1] == max_gen]
      start += len(batch)
      gen = self._decoder.generate([contexts[i] for i in batch], max_gen,
                                   Sampling(vocab_size=self._tok.vocab_size),
                                   eos_id=self._tok.eos_id)
      for i, tokens in zip(batch, gen.tokens):
        text = self._continuation_text(contexts[i], tokens)
        out[i] = postprocess_generated_text(text, settings[i][0], None)
    return out

  def _continuation_text(self, context: np.ndarray, tokens: np.ndarray) -> str:
    """The generated tokens (EOS dropped) as text, as `python -m scone_jax.generate`
    prints them after the prompt: decoded with the context (so the tokenizer spaces the
    boundary right), the context's own text cut off."""
    tokens = np.asarray(tokens).tolist()
    if tokens and tokens[-1] == self._tok.eos_id:
      tokens = tokens[:-1]
    whole = self._tok.decode(context.tolist() + tokens)
    head = self._tok.decode(context.tolist())
    return whole[len(head):] if whole.startswith(head) else self._tok.decode(tokens)


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
  if jax.process_count() > 1:
    # lm-eval would drive the scorer from every process; scoring.py's protocol has one.
    raise UserError(f"the lm-eval launcher runs in one process (W's config.distributed "
                    f'started {jax.process_count()}); score with several through python -m '
                    'scone_jax.downstream')
  scorer, _ = runner.make_scorer(run_dir, cfg, tok, _PATH.value)
  lm = SconeHarnessLM(scorer, tok, cfg.train.seq_len,
                      decoder=lambda: session.build_decoder(cfg, _WORKDIR.value)[1])
  with tempfile.TemporaryDirectory() as tmp:
    results = evaluate_tasks(lm, _TASK_DIR.value, _TASKS.value, _YAML_DIR.value or tmp)
  for name, r in results.items():
    print(f'lm-eval {_PATH.value} {name}: ' + '  '.join(f'{k} {v:.4f}' for k, v in sorted(
        r.items())))


if __name__ == '__main__':
  cli.run('downstream.lmeval', main, FLAGS)
