"""Held-out evaluation: token loss, perplexity and bits per byte per eval corpus.

  python -m scone_jax.evaluate --workdir=W [--eval_batches=N]
      [--config.distributed.* --config.mesh.*]

reopens the run through `scone_jax.run.RunDir` (W/config.json, W/run.json, the model's
weights from the latest checkpoint in W/checkpoints, the recorded eval token shards), with
`--eval_batches` overriding train.eval_batches (0 = every batch of every held-out set, the
default), and writes W/eval.json (atomically). It never reads the raw corpus, so it works
after the corpus is deleted or W is copied elsewhere. The train loop calls the same
`Evaluator` at `train.eval_every` and at the end.

On several processes (one command per process with `--config.distributed.*`, as for
training; `--config.mesh.*` for another mesh than training's) the eval batches are split
over the processes as in training, the loss summed over all of them, and process 0
prints and writes eval.json. The sums equal one process's up to float32 reduction order
(the cross-device sum is another all-reduce).

Bits per byte = mean token NLL (nats) x (corpus tokens / corpus UTF-8 bytes) / ln 2. Every
corpus token is a prediction target exactly once (documents get a BOS prepended), so when
the whole corpus is evaluated this equals summed NLL / (bytes * ln 2); with
`train.eval_batches` limiting the batches it is the same estimate on a prefix of the corpus
(`fraction_evaluated` says how much).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from scone_jax import artifacts, batches, cli, compat, paths
from scone_jax import config as config_lib
from scone_jax import mesh as mesh_lib
from scone_jax import restore
from scone_jax import run as run_lib
from scone_jax.errors import UserError
from scone_jax.model.loss import cross_entropy_sums


class NonFiniteEvalError(UserError, FloatingPointError):
  """An evaluation gave a NaN/Inf loss: the weights are not finite (W/eval.json is kept)."""


FLAGS = flags.FlagValues()
_WORKDIR = cli.define_workdir(FLAGS, 'Training run directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).',
                             flag_values=FLAGS)
_EVAL_BATCHES = flags.DEFINE_integer(
    'eval_batches', None, "Batches per eval corpus (0 = the whole set; default: the run's "
    'train.eval_batches).', flag_values=FLAGS)
_CONFIG = cli.define_config_overrides(FLAGS)


@dataclasses.dataclass(frozen=True)
class CorpusEval:
  loss: float  # Mean token cross-entropy (nats).
  perplexity: float
  bits_per_byte: float
  tokens: float  # Target tokens evaluated.
  fraction_evaluated: float  # tokens / corpus tokens.
  # Supervised fine-tuning corpora (token shards with a loss mask): the mean loss over
  # response tokens (what SFT trains) and their count; None (not written) otherwise.
  response_loss: float | None = None
  response_tokens: float | None = None


class Evaluator:
  """Runs the model's weighted loss over each eval corpus; one jitted step for all."""

  def __init__(self, cfg: config_lib.Config, graphdef: nnx.GraphDef,
               mesh: jax.sharding.Mesh, data: Any):
    """`data` has `eval_shards` ({name: TokenShards}), `table` (FgramTable or None) and
    `tokenizer` (for its bos_id): the trainer's TrainInputs or an `EvalData`."""
    self._cfg = cfg
    self._mesh = mesh
    self._data = data
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def loss_sums(params, other, batch):
      """(loss sum, weight sum) over every target, then over response targets (the loss
      mask; 0, 0 for a corpus without one)."""
      logits_BxTxV = nnx.merge(graphdef, params, other)(batch)
      sums = cross_entropy_sums(logits_BxTxV, batch['targets_BxT'], batch['weights_BxT'])
      if 'loss_mask_BxT' not in batch:  # Traced per batch structure: no extra work.
        return sums + (jnp.zeros((), jnp.float32),) * 2
      return sums + cross_entropy_sums(logits_BxTxV, batch['targets_BxT'],
                                       batch['loss_mask_BxT'])
    self._loss_sums = jax.jit(loss_sums, out_shardings=self._replicated)

  def __call__(self, params: nnx.State, other: nnx.State) -> dict[str, CorpusEval]:
    results = {}
    for name, shards in sorted(self._data.eval_shards.items()):
      it = batches.make_eval_iterator(
          self._cfg, shards, self._data.table, jax.process_index(), jax.process_count(),
          max_batches=self._cfg.train.eval_batches, bos_id=self._data.tokenizer.bos_id)
      sums = (jnp.zeros((), jnp.float32),) * 4
      with compat.set_mesh(self._mesh):
        for local_batch in it:
          sums = tuple(a + b for a, b in zip(sums, self._loss_sums(
              params, other, batches.to_global_arrays(local_batch, self._mesh))))
      loss_sum, weight_sum, response_sum, response_tokens = (float(x) for x in sums)
      results[name] = corpus_metrics(loss_sum, weight_sum, shards.num_tokens,
                                     shards.num_bytes, name)
      if getattr(shards, 'loss_mask', None) is not None and response_tokens > 0:
        results[name] = dataclasses.replace(
            results[name], response_loss=response_sum / response_tokens,
            response_tokens=response_tokens)
    return results


def corpus_metrics(nll_sum: float, tokens: float, corpus_tokens: int, corpus_bytes: int,
                   name: str = '') -> CorpusEval:
  if tokens <= 0 or corpus_bytes <= 0:
    raise ValueError(f'eval corpus {name!r} has no tokens to evaluate ({tokens} tokens, '
                     f'{corpus_bytes} bytes); give it documents or drop it from '
                     'config.data.eval_files')
  loss = nll_sum / tokens
  return CorpusEval(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                    bits_per_byte=loss * corpus_tokens / corpus_bytes / math.log(2),
                    tokens=tokens, fraction_evaluated=tokens / max(corpus_tokens, 1))


def eval_record(step: int, results: Mapping[str, CorpusEval]) -> dict[str, Any]:
  # The response fields only where there are any: other runs' eval.json stays as it was.
  return {'step': int(step),
          'corpora': {k: {f: x for f, x in dataclasses.asdict(v).items()
                          if x is not None or not f.startswith('response_')}
                      for k, v in sorted(results.items())}}


def write_eval(workdir: str, step: int, results: Mapping[str, CorpusEval]) -> dict[str, Any]:
  """Writes W/eval.json (process 0, atomically) and returns the record.

  Raises:
    NonFiniteEvalError: a corpus's loss is NaN/Inf; W/eval.json is left as it was.
  """
  bad = {name: r.loss for name, r in sorted(results.items()) if not math.isfinite(r.loss)}
  if bad:
    name, loss = next(iter(bad.items()))
    raise NonFiniteEvalError(
        f'evaluating step {step} of {workdir} gave loss {loss} on {name!r}: the weights of '
        f'checkpoint step {step} are not finite (NaN/Inf), so '
        f'{paths.join(workdir, run_lib.EVAL_FILE)} was left as it was. Check the run with '
        f'`python -m scone_jax.verify --workdir={workdir}`')
  record = eval_record(step, results)
  if jax.process_index() == 0:
    artifacts.write_json_atomic(paths.join(workdir, run_lib.EVAL_FILE), record)
  return record


@dataclasses.dataclass
class EvalData:
  """What `Evaluator` reads, reopened from a run directory."""
  tokenizer: Any
  eval_shards: dict[str, Any]
  table: Any | None


def format_eval(record: Mapping[str, Any]) -> list[str]:
  """One line per eval corpus of an eval record (as in W/eval.json), saying whether it is a
  test or a validation set and the fraction of it that was evaluated."""
  lines = []
  for name, r in record['corpora'].items():
    role = 'validation' if config_lib.is_validation_corpus(name) else 'test'
    response = (f'  response loss {r["response_loss"]:.4f} ({r["response_tokens"]:.0f} '
                'tokens)' if 'response_loss' in r else '')
    lines.append(f'eval step {record["step"]} {name} ({role}): loss {r["loss"]:.4f}  ppl '
                 f'{r["perplexity"]:.2f}  bits/byte {r["bits_per_byte"]:.4f}  '
                 f'({r["tokens"]:.0f} tokens = {r["fraction_evaluated"]:.1%} of the set)'
                 f'{response}')
  return lines


def evaluate(workdir: str, step: int | None = None, eval_batches: int | None = None,
             placement: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Restores W's weights (latest checkpoint, or `step`), writes W/eval.json; returns it.

  Args:
    workdir: the training run (local or gs://).
    step: the checkpoint step (None = the latest).
    eval_batches: overrides the run's train.eval_batches (0 = the whole held-out sets).
    placement: overrides of config.distributed / config.mesh ({'distributed.mode':
      'none'} evaluates a run trained on several processes in this one alone).
  """
  return write_eval(*evaluate_run(workdir, step, eval_batches, placement))


def evaluate_run(workdir: str, step: int | None = None, eval_batches: int | None = None,
                 placement: Mapping[str, Any] | None = None
                 ) -> tuple[str, int, dict[str, CorpusEval]]:
  """`evaluate` without writing: (the run's path, the step evaluated, results per corpus)."""
  run_dir = run_lib.RunDir(workdir)
  cfg = restore.run_config(run_dir.path, dict(placement or {}))
  if eval_batches is not None:
    cfg = config_lib.replace(cfg, **{'train.eval_batches': eval_batches})
  mesh_lib.maybe_initialize_distributed(cfg.distributed)
  step = run_dir.latest_step() if step is None else step  # Fails fast without checkpoints.
  data = EvalData(tokenizer=run_dir.tokenizer(), eval_shards=run_dir.eval_shards(),
                  table=run_dir.table() if cfg.fgram_model.uses_fgram_table else None)
  mesh = mesh_lib.make_mesh(cfg.mesh, cfg.train.batch_size)
  lm, step = run_dir.restore_model(cfg, mesh, step)
  graphdef, params, other = nnx.split(lm, nnx.Param, ...)
  return run_dir.path, step, Evaluator(cfg, graphdef, mesh, data)(params, other)


def main(argv):
  del argv
  placement = cli.overrides(_CONFIG, restore.PLACEMENT_SECTIONS)
  path, step, results = evaluate_run(_WORKDIR.value, _STEP.value, _EVAL_BATCHES.value,
                                     placement)
  # The numbers first: a run on a read-only disk still gets its results on stdout.
  if jax.process_index() == 0:
    for line in format_eval(eval_record(step, results)):
      print(line, flush=True)
  try:
    write_eval(path, step, results)
  except OSError as e:
    raise run_lib.RunError(
        f'{paths.join(path, run_lib.EVAL_FILE)} could not be written ({e.strerror or e}); '
        'the results are printed above: make the run directory writable (or copy the run '
        'to a writable place) and rerun evaluate to record them') from e


if __name__ == '__main__':
  cli.run('evaluate', main, FLAGS)
