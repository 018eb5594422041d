"""Evaluation statistics: bootstrap standard errors, paired comparison with McNemar's exact test, pass@k."""
import itertools
import math

import numpy as np
import pytest

from lmlab.eval import stats


def test_bootstrap_stderr_of_a_mean_is_the_analytic_one():
  values = np.random.default_rng(0).normal(2.0, 3.0, size=400)
  analytic = np.std(values) / math.sqrt(len(values))  # what the bootstrap estimates (no Bessel correction)
  got = stats.bootstrap_stderr(values, n_boot=4000, seed=1)
  assert abs(got - analytic) < 0.05 * analytic, (got, analytic)
  binary = np.array([1.0] * 30 + [0.0] * 70)
  assert abs(stats.bootstrap_stderr(binary, n_boot=4000) - math.sqrt(0.3 * 0.7 / 100)) < 0.003


def test_bootstrap_is_seeded_and_both_metric_forms_use_the_same_resamples():
  values = np.random.default_rng(2).random(50)
  assert stats.bootstrap_stderr(values, seed=3) == stats.bootstrap_stderr(values, seed=3)
  assert stats.bootstrap_stderr(values, seed=3) != stats.bootstrap_stderr(values, seed=4)
  as_function = stats.bootstrap_replicates(lambda idx: values[idx].mean(), n=50, n_boot=300, seed=5)
  np.testing.assert_allclose(as_function, stats.bootstrap_replicates(values, n_boot=300, seed=5), rtol=1e-12)
  # A non-mean metric: each replicate is the median of a resample, the mean of two of the original values.
  medians = stats.bootstrap_replicates(lambda idx: np.median(values[idx]), n=50, n_boot=300, seed=5)
  midpoints = ((values[:, None] + values[None, :]) / 2).ravel()
  assert np.all(np.min(np.abs(midpoints[None, :] - medians[:, None]), axis=1) < 1e-12)


def test_resamples_are_chunked_without_changing_their_count(monkeypatch):
  monkeypatch.setattr(stats, 'CHUNK_ELEMENTS', 70)  # 7 resamples of 10 per chunk
  chunks = list(stats.resample_indices(10, n_boot=20, seed=0))
  assert [len(c) for c in chunks] == [7, 7, 6] and all(c.shape[1] == 10 for c in chunks)
  assert all(0 <= c.min() and c.max() < 10 for c in chunks)


@pytest.mark.parametrize('only_a, only_b, expected', [(3, 0, 0.25), (5, 1, 14 / 64), (2, 2, 1.0), (0, 1, 1.0),
                                                      (10, 0, 2 / 1024)])
def test_mcnemar_exact_p_by_hand(only_a, only_b, expected):
  """p = 2 * P(Binomial(n, 1/2) <= min(b, c)), capped at 1; hand values: 2 * 1/8, 2 * (1 + 6)/64, ..."""
  a = [1] * only_a + [0] * only_b + [1, 1, 0]  # plus concordant pairs, which do not count
  b = [0] * only_a + [1] * only_b + [1, 1, 0]
  assert abs(stats.mcnemar_p(a, b) - expected) < 1e-12


def test_mcnemar_matches_scipy_binomtest():
  scipy_stats = pytest.importorskip('scipy.stats', reason='scipy not installed')
  for only_a, only_b in [(1, 7), (12, 30), (40, 41), (0, 25), (300, 360), (2000, 2150)]:
    a = np.array([1] * only_a + [0] * only_b)
    expected = scipy_stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
    assert abs(stats.mcnemar_p(a, 1 - a) - expected) < 1e-9 * max(expected, 1e-300) + 1e-15, (only_a, only_b)


def test_a_model_compared_with_itself_differs_by_nothing():
  a = np.random.default_rng(0).integers(0, 2, 200).astype(float)
  result = stats.paired_comparison(a, a)
  assert (result['difference'], result['ci_low'], result['ci_high'], result['p_value']) == (0.0, 0.0, 0.0, 1.0)
  assert result['a_only'] == result['b_only'] == 0 and result['n'] == 200


def test_paired_comparison_of_two_models():
  rng = np.random.default_rng(1)
  b = rng.integers(0, 2, 500).astype(float)
  a = np.where(rng.random(500) < 0.3, 1.0, b)  # A fixes about 30% of B's errors and breaks none
  result = stats.paired_comparison(a, b, n_boot=2000, seed=0)
  assert result['difference'] == pytest.approx(a.mean() - b.mean())
  assert result['b_only'] == 0 and result['a_only'] == int(np.sum(a > b)) > 0
  assert 0 < result['ci_low'] < result['difference'] < result['ci_high']
  assert result['p_value'] == pytest.approx(2 * 0.5 ** result['a_only'])
  # Pairing matters: the paired interval is narrower than the unpaired one of two independent means.
  unpaired = math.sqrt(a.var() / len(a) + b.var() / len(b))
  assert result['stderr'] < 0.5 * unpaired
  scores = stats.paired_comparison(a * 0.5 + 0.25, b)  # not binary: no McNemar
  assert scores['p_value'] is None and 'a_only' not in scores


def _pass_at_k_by_enumeration(n, c, k):
  outcomes = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumerating_every_k_subset():
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert abs(stats.pass_at_k(n, c, k) - _pass_at_k_by_enumeration(n, c, k)) < 1e-12, (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow():
  exact = 1 - math.comb(1998, 100) / math.comb(2000, 100)  # Python integers: exact
  assert abs(stats.pass_at_k(2000, 2, 100) - exact) < 1e-14
  assert stats.pass_at_k(10 ** 6, 1, 1) == pytest.approx(1e-6, rel=1e-9)


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='pass@k needs 0 <= c <= n and 1 <= k <= n; got n=5, c=6, k=1'):
    stats.pass_at_k(5, 6, 1)
  with pytest.raises(ValueError, match='binary'):
    stats.mcnemar_p([0.5, 1], [0, 1])
  with pytest.raises(ValueError, match='equally long'):
    stats.paired_comparison([1, 0], [1])
  with pytest.raises(ValueError, match='needs n'):
    stats.bootstrap_stderr(lambda idx: 0.0)
  with pytest.raises(ValueError, match='at least 1 example'):
    stats.bootstrap_stderr([])
