"""The benchmark scripts still run end to end (their numbers are not checked here: they are
measurements, recorded in BENCHMARKS.md)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~40 s: mining, Beam with 1 and 2 workers, a table, two stores.
def test_bench_scale_quick_prints_every_target(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_scale.py'), '--quick',
       f'--dir={tmp_path}'], capture_output=True, text=True, check=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT))
  out = proc.stdout
  for line in ('mining vs the np.sort bound', 'Beam table == local miner',
               'table, S = 100,000', 'RAM-tier load, S = 200,000, cold cache',
               'gather, S = 200,000, 16 rows', 'disk tier, batch 16, warm',
               '== what one host serves'):
    assert line in out, (line, out[-3000:])
  beam = [l for l in out.splitlines() if l.startswith('Beam table == local miner')]
  assert len(beam) == 1 and beam[0].rstrip().endswith('holds'), beam
  assert os.listdir(tmp_path) == []  # Scratch files removed.
