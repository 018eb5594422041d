"""Statistics for evaluation and the self-improvement gate: bootstrap standard errors, paired comparison of two
models on the same examples (paired bootstrap interval, McNemar's exact test) and the unbiased pass@k.

Numpy only and seeded: the same inputs and seed give the same numbers on every machine.
"""
from typing import Callable, Iterator, Sequence

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64), whatever n and n_boot


def resample_indices(n: int, n_boot: int = 1000, seed: int = 0) -> Iterator[np.ndarray]:
  """[R, n] arrays of indices drawn with replacement, n_boot rows in all, from one seeded generator."""
  if n < 1 or n_boot < 2:
    raise ValueError(f'the bootstrap needs at least 1 example and 2 resamples; got n={n}, n_boot={n_boot}')
  rng = np.random.default_rng(seed)
  rows = max(1, CHUNK_ELEMENTS // n)
  for start in range(0, n_boot, rows):
    yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def bootstrap_replicates(metric: Sequence[float] | np.ndarray | Callable[[np.ndarray], float], n: int | None = None,
                         n_boot: int = 1000, seed: int = 0) -> np.ndarray:
  """The metric on each of n_boot resamples of the examples.

  `metric` is either per-example values (the metric is their mean; vectorised) or a function of one index
  array that returns the metric of those examples (for metrics that are not means, such as ECE); then `n`,
  the number of examples, is required.
  """
  if callable(metric):
    if n is None:
      raise ValueError('a metric given as a function of indices needs n, the number of examples')
    return np.array([metric(idx) for chunk in resample_indices(n, n_boot, seed) for idx in chunk], np.float64)
  values = np.asarray(metric, np.float64)
  if values.ndim != 1:
    raise ValueError(f'per-example metric values must be one-dimensional; got shape {values.shape}')
  return np.concatenate([values[idx].mean(axis=1) for idx in resample_indices(len(values), n_boot, seed)])


def bootstrap_stderr(metric, n: int | None = None, n_boot: int = 1000, seed: int = 0) -> float:
  """Bootstrap standard error (sample std of `bootstrap_replicates`, like lm-eval's) of a metric over examples."""
  return float(np.std(bootstrap_replicates(metric, n, n_boot, seed), ddof=1))


def mcnemar_p(a: Sequence[float], b: Sequence[float]) -> float:
  """Exact two-sided McNemar p-value for paired binary outcomes: a binomial test (p = 1/2) on the pairs where
  exactly one model is right; 1 when there are none."""
  a, b = _paired(a, b)
  if not _binary(a, b):
    raise ValueError('McNemar\'s test needs binary (0/1) outcomes; use paired_comparison\'s interval for others')
  only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
  n, k = only_a + only_b, min(only_a, only_b)
  if n == 0:
    return 1.0
  i = np.arange(k, dtype=np.float64)
  # log C(n, j) for j = 0..k by the running ratio C(n, j+1) / C(n, j) = (n - j) / (j + 1): no overflow.
  log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - i) - np.log(i + 1))])
  log_tail = np.logaddexp.reduce(log_comb) - n * np.log(2.0)
  return float(min(1.0, 2.0 * np.exp(log_tail)))


def paired_comparison(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
  """Model A against model B on the same examples (per-example metric values, the metric being their mean).

  Returns {'difference': mean(a) - mean(b), 'ci_low', 'ci_high' (percentile interval of the paired bootstrap:
  the same resampled examples for both), 'stderr', 'n', 'p_value'}: McNemar's exact p when every value is 0 or
  1 (with the discordant counts 'a_only' and 'b_only'), else None.
  """
  a, b = _paired(a, b)
  if not 0 < confidence < 1:
    raise ValueError(f'confidence={confidence} must be between 0 and 1')
  replicates = bootstrap_replicates(a - b, n_boot=n_boot, seed=seed)
  low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
  result = {'difference': float(np.mean(a) - np.mean(b)), 'ci_low': float(low), 'ci_high': float(high),
            'stderr': float(np.std(replicates, ddof=1)), 'n': len(a), 'p_value': None}
  if _binary(a, b):
    result.update(p_value=mcnemar_p(a, b), a_only=int(np.sum(a > b)), b_only=int(np.sum(b > a)))
  return result


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
  computed as 1 - prod_{i=n-c+1..n} (1 - k / i), which never forms the huge binomials."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f'pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}')
  if n - c < k:
    return 1.0  # every k-subset holds a correct sample
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or not len(a):
    raise ValueError(f'paired statistics need two equally long, non-empty 1-d arrays (one value per example); '
                     f'got shapes {a.shape} and {b.shape}')
  return a, b


def _binary(a: np.ndarray, b: np.ndarray) -> bool:
  return bool(np.all(np.isin(a, (0, 1)) & np.isin(b, (0, 1))))
