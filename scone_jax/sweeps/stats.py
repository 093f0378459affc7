"""Statistics over seeds for reports: mean, spread, t-intervals, paired differences.

Method (stated in every report that uses it): a metric's value per seed is one sample;
the interval is the two-sided Student-t confidence interval of the mean over seeds,
mean +- t_{1-a/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof 1). A paired
difference (SCONE minus baseline) takes, for each seed both arms ran, the difference of
their values (same seed = same data order and initialisation stream), and gives the
t-interval of the mean of those differences. With fewer than 2 samples there is no
interval (reported as such, never as zero width). Perplexity is summarised as exp of the
loss's mean and interval (the geometric mean over seeds), so its interval is never
negative; paired perplexity differences use the per-seed perplexities.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
METHOD = (f'{CONFIDENCE:.0%} two-sided Student-t interval of the mean over seeds '
          '(mean +- t(n-1) * sample std / sqrt(n)); paired differences are taken per seed '
          '(same seed = same data order for both arms); perplexity = exp(loss): its mean and '
          'interval are exp of the loss mean and interval (geometric mean over seeds)')


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean, spread and confidence interval of one metric over seeds."""
  n: int
  mean: float
  std: float  # Sample standard deviation (ddof 1); nan for n < 2.
  lo: float  # Interval bounds; nan for n < 2.
  hi: float
  min: float
  max: float

  @property
  def excludes_zero(self) -> bool:
    """True when the interval exists and does not contain 0."""
    return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def t_quantile(p: float, df: int) -> float:
  from scipy import stats  # Deferred: only reports need it.
  return float(stats.t.ppf(p, df))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
  """Summary of finite values (non-finite ones are dropped: a diverged run has none)."""
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  n = len(x)
  if n == 0:
    nan = math.nan
    return Summary(0, nan, nan, nan, nan, nan, nan)
  mean = float(x.mean())
  if n < 2:
    return Summary(1, mean, math.nan, math.nan, math.nan, mean, mean)
  std = float(x.std(ddof=1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
  return Summary(n, mean, std, mean - half, mean + half, float(x.min()), float(x.max()))


def paired(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float],
           confidence: float = CONFIDENCE) -> tuple[Summary, list[int]]:
  """Summary of a[seed] - b[seed] over the seeds both have; returns it and those seeds."""
  seeds = sorted(s for s in a_by_seed if s in b_by_seed
                 and math.isfinite(a_by_seed[s]) and math.isfinite(b_by_seed[s]))
  return summarize([a_by_seed[s] - b_by_seed[s] for s in seeds], confidence), seeds
