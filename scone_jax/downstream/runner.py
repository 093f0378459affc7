"""Scoring a task's documents and the run-level driver that writes W/downstream.json.

  python -m scone_jax.downstream --workdir=W --tasks=piqa,arc_easy --task_dir=D \\
      [--path=train|store] [--preset=olmo|olmes] [--rows_per_batch=8] [--notruncate]
      [--config.distributed.*]

Task `name` is read from D/name.jsonl (and, for a few-shot preset, its examples from
D/name.dev.jsonl). Every task file is read and validated, and every request tokenized,
before anything is scored. W/downstream.json is rewritten (atomically) after each task:
  {"format_version": 1,
   "paths": {"train"|"store": {
       "step", "xla_flops_per_token", "flops_row_len",
       "tasks": {name: {"preset", "metric", "value", "stderr", "n", "chance",
                        "variants": {variant: {"value", "stderr"}}, "truncated",
                        "requests", "tokens", "seconds", "tokens_per_second",
                        "task_file", "task_sha256", "dev_sha256"}}}}}
A rerun (e.g. after a kill) skips a task whose entry has the same step, preset and task
file bytes. Contexts longer than the model's window (config.model.max_seq_len, BOS and
continuation included) lose their oldest tokens: `truncated` counts the requests cut;
with --notruncate such a document is an error instead.

Several processes (one command per process, `--config.distributed.*` as for training, or
W's own config.distributed): process 0 reads the task files and W/downstream.json, plans
every batch and broadcasts it (scoring.py's protocol), every process runs the jitted
scorer on its slice of the global batch, and only process 0 writes the file.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

import jax
import numpy as np

from scone_jax import artifacts, paths
from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax import run as run_lib
from scone_jax.downstream import metrics, presets, scoring
from scone_jax.downstream.tasks import Doc, TaskFileError, file_fingerprint, read_tasks
from scone_jax.serve import session

RESULTS_FILE = 'downstream.json'
FORMAT_VERSION = 1
PATHS = ('train', 'store')


@dataclasses.dataclass
class Encoded:
  """A task's requests as scored sequences: seqs[index_DxC[d][c]] is choice c of doc d
  (conditional); uncond_DxC likewise for PMI (None when not scored)."""
  seqs: list[scoring.Seq]
  cond: list[list[int]]
  uncond: list[list[int]] | None
  truncated: int


def split_encode(tokenizer, pairs: Sequence[tuple[str, str]]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(context tokens, continuation tokens) per (context, continuation), as lm-eval splits
  them: trailing whitespace of the context moves to the continuation, the whole string is
  encoded, and the continuation is what follows the context's own encoding."""
  ctxs, wholes = [], []
  for ctx, cont in pairs:
    n = len(ctx) - len(ctx.rstrip())
    if n:
      ctx, cont = ctx[:-n], ctx[-n:] + cont
    ctxs.append(ctx)
    wholes.append(ctx + cont)
  ctx_enc = tokenizer.encode(ctxs)
  whole_enc = tokenizer.encode(wholes)
  return [(np.asarray(w[:len(c)], np.int32), np.asarray(w[len(c):], np.int32))
          for c, w in zip(ctx_enc, whole_enc)]


def encode(tokenizer, reqs: Sequence[presets.Request], window: int, with_uncond: bool,
           truncate: bool = True, source: str = '') -> Encoded:
  """Tokenizes every request (one `encode` call per kind); fails before any scoring.

  Raises:
    TaskFileError: a continuation that leaves no room in the window, an empty one, or
      (truncate=False) a context that does not fit.
  """
  pairs, cond = [], []
  for r in reqs:
    cond.append(list(range(len(pairs), len(pairs) + len(r.continuations))))
    pairs += [(r.context, c) for c in r.continuations]
  uncond = None
  if with_uncond:
    uncond = []
    for r in reqs:
      uncond.append(list(range(len(pairs), len(pairs) + len(r.continuations))))
      pairs += [(r.unconditional, c) for c in r.continuations]
  owner = [d for d, r in enumerate(reqs) for _ in r.continuations]
  owner += owner if with_uncond else []
  seqs, truncated = [], 0
  for i, (ctx, cont) in enumerate(split_encode(tokenizer, pairs)):
    seq, cut = scoring.make_seq(tokenizer.bos_id, ctx, cont, window, truncate,
                                f'{source}: document {reqs[owner[i]].doc.id!r}')
    seqs.append(seq)
    truncated += cut
  return Encoded(seqs, cond, uncond, truncated)


def choice_scores(docs: Sequence[Doc], enc: Encoded, ll_N: np.ndarray
                  ) -> list[metrics.ChoiceScores]:
  out = []
  for d, doc in enumerate(docs):
    chars_C, bytes_C = metrics.choice_lengths(doc.choices)
    idx = enc.cond[d]
    out.append(metrics.ChoiceScores(
        gold=doc.gold, ll_C=ll_N[idx],
        tokens_C=np.array([enc.seqs[i].num_continuation for i in idx], np.float64),
        chars_C=chars_C, bytes_C=bytes_C,
        ll_uncond_C=None if enc.uncond is None else ll_N[enc.uncond[d]]))
  return out


@dataclasses.dataclass
class TaskInput:
  """A task read, validated and tokenized: ready to score."""
  name: str
  file: str
  sha256: str
  dev_sha256: str | None
  docs: list[Doc]
  encoded: Encoded


def task_file(task_dir: str, name: str, dev: bool = False) -> str:
  return paths.join(task_dir, f'{name}.dev.jsonl' if dev else f'{name}.jsonl')


def prepare_tasks(task_dir: str, names: Sequence[str], preset: str, tokenizer, window: int,
                  truncate: bool = True) -> list[TaskInput]:
  """Reads, validates and tokenizes every task: all input errors surface here."""
  p = presets.get(preset)
  if not names:
    raise TaskFileError(f'no tasks given; pass --tasks from {list(presets.TASKS)}')
  for name in names:
    presets.check_task(name)
  out = []
  for name in names:
    file = task_file(task_dir, name)
    docs = read_tasks(file)
    dev, dev_sha = None, None
    if p.num_shots:
      dev_file = task_file(task_dir, name, dev=True)
      dev, dev_sha = read_tasks(dev_file), file_fingerprint(dev_file)
    reqs = presets.requests(preset, name, docs, dev)
    # Every variant is reported, so the unconditional requests of PMI are always scored.
    enc = encode(tokenizer, reqs, window, True, truncate, file)
    out.append(TaskInput(name, file, file_fingerprint(file), dev_sha, docs, enc))
  return out


def score_task(scorer: scoring.Scorer, task: TaskInput, preset: str) -> dict[str, Any]:
  """One task's entry of downstream.json (see the module docstring)."""
  start = time.perf_counter()
  ll_N, _ = scorer(task.encoded.seqs)
  seconds = time.perf_counter() - start
  summary = metrics.summarize(choice_scores(task.docs, task.encoded, ll_N))
  metric = presets.headline(preset, task.name)
  tokens = int(sum(len(s.tokens) - 1 for s in task.encoded.seqs))
  return {
      'preset': preset, 'metric': metric, 'value': summary[metric]['value'],
      'stderr': summary[metric]['stderr'], 'n': len(task.docs),
      'chance': summary.pop('chance')['value'], 'variants': summary,
      'truncated': task.encoded.truncated, 'requests': len(task.encoded.seqs),
      'tokens': tokens, 'seconds': seconds, 'tokens_per_second': tokens / max(seconds, 1e-9),
      'task_file': task.file, 'task_sha256': task.sha256, 'dev_sha256': task.dev_sha256,
  }


def format_line(path: str, name: str, r: dict[str, Any]) -> str:
  return (f'downstream {path} {name} ({r["preset"]}): {r["metric"]} {r["value"]:.4f} '
          f'+- {r["stderr"]:.4f} (n={r["n"]}, chance {r["chance"]:.3f}, truncated '
          f'{r["truncated"]}, {r["tokens_per_second"]:.0f} tokens/s)')


def read_results(workdir: str) -> dict[str, Any]:
  """W/downstream.json, or an empty record."""
  path = paths.join(workdir, RESULTS_FILE)
  if not paths.exists(path):
    return {'format_version': FORMAT_VERSION, 'paths': {}}
  try:
    record = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise run_lib.RunError(f'{path} is corrupted ({e}); delete it to score every task '
                           'again') from e
  if record.get('format_version') != FORMAT_VERSION:
    raise run_lib.RunError(f'{path} has format_version {record.get("format_version")}, '
                           f'expected {FORMAT_VERSION}; delete it to score again')
  return record


def open_run(workdir: str, path: str, overrides: dict[str, Any] | None = None
             ) -> tuple[run_lib.RunDir, Any, Any]:
  """(RunDir, its config with `overrides` ({'distributed.<key>': value}), its tokenizer)
  after checking `path` suits the run; starts JAX's multi-process runtime if the config
  asks for one."""
  if path not in PATHS:
    raise TaskFileError(f'unknown path {path!r}; use one of {list(PATHS)}')
  run_dir = run_lib.RunDir(workdir)
  cfg = run_dir.config()
  if overrides:
    cfg = config_lib.replace(cfg, **overrides)
  mesh_lib.maybe_initialize_distributed(cfg.distributed)
  if path == 'store' and not cfg.fgram_model.uses_fgram_table:
    raise TaskFileError(
        'path=store scores through an exported f-gram store: this run is a baseline or '
        "kind='hashed' (scored through the training forward only); use --path=train")
  return run_dir, cfg, run_dir.tokenizer()


def make_scorer(run_dir: run_lib.RunDir, cfg, tokenizer, path: str,
                rows_per_batch: int = 0, step: int | None = None
                ) -> tuple[scoring.Scorer, int]:
  """Restores the run's weights (latest checkpoint, or `step`) and opens its table (and
  for path=store its export); returns the scorer and the step."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  lm, step = run_dir.restore_model(cfg, mesh, step)
  table = run_dir.table(cfg.fgram) if cfg.fgram_model.uses_fgram_table else None
  store = (session.open_checked_store(cfg, run_dir.path, step, table, tokenizer,
                                      lambda: run_lib.weights_fingerprint(lm))
           if path == 'store' else None)
  dp = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp')]))
  rows = rows_per_batch or max(8, dp)
  if rows % dp:
    raise TaskFileError(f'--rows_per_batch={rows} must be a multiple of the mesh\'s '
                        f'{dp} data-parallel devices')
  scorer = scoring.Scorer(lm, mesh, window=cfg.model.max_seq_len, rows_per_batch=rows,
                          table=table, store=store, stored_rule=cfg.fgram_model.stored_rule,
                          capacity=cfg.fgram_model.capacity,
                          bucket_growth=cfg.fgram_model.bucket_growth)
  return scorer, step


def _prepare_on_process_0(task_dir: str, tasks: Sequence[str], preset: str, tokenizer,
                          window: int, truncate: bool) -> list[TaskInput] | None:
  """Process 0's `prepare_tasks` (None on the others); a bad input fails on every process
  before the model is restored."""
  inputs, error = None, None
  if jax.process_index() == 0:
    try:
      inputs = prepare_tasks(task_dir, tasks, preset, tokenizer, window, truncate)
    except Exception as e:  # pylint: disable=broad-except  (told to the others, raised)
      error = e
  ok = error is None
  if jax.process_count() > 1:
    ok = bool(scoring.broadcast_from_0(np.array(ok, np.int32)))
  if error is not None:
    raise error
  if not ok:
    raise scoring.DriverFailed()
  return inputs


def run(workdir: str, tasks: Sequence[str], task_dir: str, path: str = 'train',
        preset: str = 'olmo', rows_per_batch: int = 0, truncate: bool = True,
        step: int | None = None, log=print, overrides: dict[str, Any] | None = None
        ) -> dict[str, Any] | None:
  """Scores `tasks` with W's model through `path`; writes and returns W/downstream.json.

  With several processes (`overrides` or W's config.distributed), process 0 reads the
  task files, decides what to score, drives the scoring and alone writes the file; the
  others score the batches it sends and return None.
  """
  presets.get(preset)
  run_dir, cfg, tokenizer = open_run(workdir, path, overrides)
  window = cfg.model.max_seq_len
  inputs = _prepare_on_process_0(task_dir, tasks, preset, tokenizer, window, truncate)
  scorer, step = make_scorer(run_dir, cfg, tokenizer, path, rows_per_batch, step)
  if jax.process_index() != 0:
    scorer.serve()
    return None
  with scorer.driving():
    return _score_tasks(scorer, run_dir, inputs, path, preset, step, window, log)


def _score_tasks(scorer: scoring.Scorer, run_dir: run_lib.RunDir, inputs: list[TaskInput],
                 path: str, preset: str, step: int, window: int, log) -> dict[str, Any]:
  """Process 0: scores the tasks not done yet, rewriting W/downstream.json after each."""
  record = read_results(run_dir.path)
  entry = record['paths'].setdefault(path, {'tasks': {}})
  if entry.get('step') != step:
    entry.update(step=step, tasks={})  # Another checkpoint: nothing carries over.
  if 'xla_flops_per_token' not in entry:
    t = scoring.row_lengths(window)[0]
    entry.update(xla_flops_per_token=scoring.flops_per_token(scorer, t), flops_row_len=t)
  out_file = paths.join(run_dir.path, RESULTS_FILE)
  for task in inputs:
    done = entry['tasks'].get(task.name)
    if (done and done['preset'] == preset and done['task_sha256'] == task.sha256 and
        done['dev_sha256'] == task.dev_sha256):
      log(format_line(path, task.name, done) + ' [resumed]')
      continue
    entry['tasks'][task.name] = score_task(scorer, task, preset)
    artifacts.write_json_atomic(out_file, record)
    log(format_line(path, task.name, entry['tasks'][task.name]))
  return record
