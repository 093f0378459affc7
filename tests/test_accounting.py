"""One accounting, printed everywhere: the sweep dry run, results.csv and REPORT.md, the
plots' data and `generate --accounting_only` agree on every figure they share, for every
arm of the comparison sweeps; S of a finished run is its real table's; and the one reader
of W/metrics.jsonl (local and gs://)."""

import json
import os

import pytest

from gcs_emulator import gcs  # noqa: F401  (the fixture)
from scone_jax import metrics_file, paths, report
from scone_jax.model import arm_accounting
from scone_jax.run import RunDir
from scone_jax.serve import accounting as serve_accounting
from scone_jax.sweeps import analysis, plots, spec, study, tables
from scone_jax.sweeps import results as results_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(REPO, 'experiments', 'sweeps')
TINY = os.path.join(REPO, 'experiments', 'tiny.py')


def _finish(sweep: spec.Sweep, table_rows=None) -> None:
  """Writes what a finished point leaves: point.json, run.json, metrics and eval.json.
  `table_rows(cfg)` is the mined table's rows train records (default: as requested)."""
  for i, p in enumerate(sweep.points):
    spec.write_point_json(sweep, p)
    rows = (table_rows or (lambda c: c.fgram.requested_rows))(p.cfg)
    with open(os.path.join(p.workdir, 'run.json'), 'w') as f:
      json.dump({'fgram_table_rows': rows if p.cfg.fgram_model.uses_fgram_table else 0}, f)
    with open(os.path.join(p.workdir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'step': 1, 'loss': 4.0}) + '\n')
    loss = 3.0 - 0.01 * i
    with open(os.path.join(p.workdir, 'eval.json'), 'w') as f:
      json.dump({'step': p.cfg.train.steps,
                 'corpora': {'test': {'loss': loss, 'perplexity': 2.718281828 ** loss}}}, f)


def _generate_figures(cfg) -> dict[str, float]:
  """What generate --accounting_only prints for the config's analytical figures, parsed."""
  text = serve_accounting.format_rows(serve_accounting.figure_rows(
      arm_accounting.account(cfg)))
  out = {}
  for label in (serve_accounting.ACCEL_PARAMS, serve_accounting.SIDE_PARAMS,
                serve_accounting.HOST_ROWS, serve_accounting.INFER_FLOPS,
                serve_accounting.TRAIN_WORST):
    line = next(line for line in text.splitlines() if line.startswith(label))
    out[label] = float(line[len(label):].split()[0].replace(',', ''))
  return out


def _compare_paper(root):
  return spec.load_sweep(os.path.join(SWEEPS, 'compare_paper.py'), root)


def _compare_study(root):
  s = study.load_study(os.path.join(SWEEPS, 'compare.py'))
  return study.compare_sweep(s, root, {a: s.learning_rates[0] for a in s.arms})


@pytest.mark.parametrize('make,num_arms', [(_compare_paper, 8), (_compare_study, 6)],
                         ids=['compare_paper', 'compare'])
def test_every_surface_prints_the_same_figures(tmp_path, make, num_arms):
  sweep = make(str(tmp_path))
  dry = {r['run']: r for r in spec.accounting_rows(sweep)}
  dry_arm = {r['run']: r for r in spec.arm_rows(sweep)}
  _finish(sweep)
  results = results_lib.collect(sweep.dir)
  csv_rows = {r['run']: r for r in report.run_rows(results)}
  arms, _ = analysis.arms_of(results, None)
  resources = {r['arm']: r for r in report.resource_rows(arms)}
  assert len(arms) == num_arms and len(results) == len(sweep.points)
  kinds = {a.cfg.fgram_model.kind for a in arms}
  assert kinds == {'network', 'table', 'hashed'}  # The arms the issue names are there.
  for a in arms:
    plotted = plots.inference_flops(a)
    for r in a.runs:
      run, d = r.name, r.cfg.model.d_model
      gen = _generate_figures(r.cfg)
      per_run, per_arm, res = dry[run], dry_arm[run], resources[a.name]
      # Every figure each surface shares, against the dry run's per-run row.
      assert csv_rows[run]['accel_params'] == per_run['accel_params'] == (
          per_arm['infer_accel_params']) == res['infer_accel_params'] == (
              gen[serve_accounting.ACCEL_PARAMS])
      assert csv_rows[run]['offloaded_params'] == per_run['offloaded_params'] == (
          per_arm['host_rows'] * d) == res['host_rows'] * d == (
              gen[serve_accounting.HOST_ROWS] * d)
      assert csv_rows[run]['af_params'] == per_run['af_params'] == (
          gen[serve_accounting.SIDE_PARAMS])
      assert csv_rows[run]['S'] == csv_rows[run]['num_fgrams'] == per_run['S'] == (
          per_arm['S']) == res['S'] == r.num_fgrams
      flops = per_run['infer_flops']
      assert csv_rows[run]['infer_flops'] == per_arm['infer_flops_tok'] == (
          res['infer_flops_tok']) == plotted == flops
      assert gen[serve_accounting.INFER_FLOPS] == pytest.approx(flops, rel=1e-3)  # '.4g'
      train = per_arm['train_flops_tok']
      assert csv_rows[run]['train_flops_seq_worst'] == per_run['train_flops_seq_worst'] == (
          train * r.cfg.train.seq_len)
      assert gen[serve_accounting.TRAIN_WORST] == pytest.approx(train, rel=1e-3)
      # The decode step's extras are in every inference figure, not only the per-arm one.
      assert flops == arm_accounting.account(r.cfg).infer_flops_backbone + (
          per_arm['elementwise_tok'])
      if a.cfg.fgram_model.kind == 'hashed':
        assert per_run['S'] == 0 and per_arm['host_rows'] > 0


def test_report_md_shows_the_dry_runs_per_arm_table(tmp_path):
  sweep = _compare_paper(str(tmp_path))
  _finish(sweep)
  md = paths.read_text(report.write_report(sweep.dir)['markdown'])
  arms, _ = analysis.arms_of(results_lib.collect(sweep.dir), None)
  table = tables.markdown_table(report.resource_rows(arms))
  assert table in md and table.count('\n') == 1 + 8  # header, rule, one line per arm
  for r in spec.arm_rows(sweep):
    row = dict(r)
    del row['run']
    assert ' | '.join(tables.fmt_cell(v) for v in row.values()) in md


def test_a_finished_run_states_its_real_s(tmp_path):
  """A table mined short of fgram.use_size: the report states S = rows_used(rows)."""
  path = tmp_path / 'short.py'
  path.write_text(f'BASE_CONFIG = {TINY!r}\ndef get_sweep():\n  return ['
                  "{'fgram_model.num_layers': 0}, {'fgram_model.num_layers': 1, "
                  "'fgram.use_size': 1000}]\n")
  sweep = spec.load_sweep(str(path), str(tmp_path / 'runs'))
  assert [r['S'] for r in spec.accounting_rows(sweep)] == [0, 1000]  # Before any table.
  _finish(sweep, table_rows=lambda cfg: 393)
  results = sorted(results_lib.collect(sweep.dir), key=lambda r: r.cfg.has_fgram_side)
  assert [r.num_fgrams for r in results] == [0, 393]
  rows = report.run_rows(results)
  assert [(r['S'], r['num_fgrams']) for r in rows] == [(0, 0), (393, 393)]
  assert rows[1]['offloaded_params'] == 393 * results[1].cfg.model.d_model
  arms, _ = analysis.arms_of(results, None)
  assert sorted(row['S'] for row in analysis.summary_rows(arms, 'test')) == [0, 393]


METRICS = ('{"step": 1, "loss": 5.0, "batch/fgram_af_tokens_per_token": 1.0}\n'
           '[1, 2]\n'  # Not a record.
           '{"step": 2, "eval/x": 3.0}\n'
           '{"step": 3, "loss": 4.0, "batch/fgram_af_tokens_per_token": 2.0}\n'
           '{"step": 4, "lo')  # A run killed (or still writing) mid-line.


def _check_reader(workdir: str) -> None:
  records = metrics_file.read(workdir)
  assert [r['step'] for r in records] == [1, 2, 3]
  assert RunDir(workdir).metrics() == records
  assert metrics_file.last(workdir, 'loss') == records[2]
  assert metrics_file.last(workdir, 'eval/x') == records[1]
  assert metrics_file.last(workdir, 'nothing') is None
  assert metrics_file.curve(records) == [(1, 5.0), (3, 4.0)]
  assert serve_accounting.measured_af_tokens_per_token(workdir) == 1.5


def test_metrics_reader_local(tmp_path):
  assert metrics_file.read(str(tmp_path)) == [] and metrics_file.last(str(tmp_path),
                                                                      'loss') is None
  assert serve_accounting.measured_af_tokens_per_token(str(tmp_path)) is None
  (tmp_path / 'metrics.jsonl').write_text(METRICS)
  _check_reader(str(tmp_path))


def test_metrics_reader_reads_the_tail_of_a_long_file(tmp_path):
  lines = [json.dumps({'step': s, 'loss': 10.0 - s / 1000, 'pad': 'x' * 100})
           for s in range(1, 2001)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 2001')
  assert metrics_file.last(str(tmp_path), 'loss')['step'] == 2000
  assert len(metrics_file.read(str(tmp_path))) == 2000


def test_metrics_reader_on_a_bucket(gcs):  # noqa: F811
  """gs:// runs: generate --accounting_only used to lose the measured A_f rate here."""
  workdir = f'{gcs}/metrics_reader/run'
  paths.write_bytes(paths.join(workdir, 'metrics.jsonl'), METRICS.encode())
  _check_reader(workdir)
