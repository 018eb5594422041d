"""Multiple-choice metrics from per-choice log-likelihoods: lm-evaluation-harness's accuracies plus calibration.

Examples may have different numbers of choices. Every argmax takes the FIRST of tied choices (numpy's argmax,
as lm-eval), so a model that scores all choices alike predicts choice 0. Probabilities are the softmax of an
example's choice log-likelihoods (lm-eval's `brier_score` input).
"""
from typing import Sequence

import numpy as np

from lmlab.eval import stats

N_BINS = 15  # equal-width confidence bins for ECE (Guo et al. 2017)


def choice_lengths(choices: Sequence[str]) -> tuple[list[int], list[int]]:
  """(characters, UTF-8 bytes) of each choice string: the denominators of acc_norm and acc_bytes."""
  return [len(c) for c in choices], [len(c.encode('utf-8')) for c in choices]


def calibration(confidence: Sequence[float], correct: Sequence[float], n_bins: int = N_BINS) -> dict:
  """Expected calibration error sum_b n_b/n |acc_b - conf_b| over equal-width bins (lo, hi] of [0, 1], with
  the reliability diagram: per-bin 'counts', 'accuracy' and 'confidence' (None in empty bins) and 'edges'."""
  confidence_N, correct_N = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  counts, accuracy_sums, confidence_sums = _binned(confidence_N, correct_N, edges)
  mean = lambda sums: [float(s / c) if c else None for s, c in zip(sums, counts)]
  return {'ece': _ece(confidence_N, correct_N, edges), 'counts': counts.astype(int).tolist(),
          'accuracy': mean(accuracy_sums), 'confidence': mean(confidence_sums), 'edges': edges.tolist()}


def multiple_choice_metrics(logliks: Sequence[Sequence[float]], labels: Sequence[int],
                            char_lengths: Sequence[Sequence[int]] | None = None,
                            byte_lengths: Sequence[Sequence[int]] | None = None,
                            unconditional: Sequence[Sequence[float]] | None = None, n_boot: int = 1000, seed: int = 0,
                            n_bins: int = N_BINS) -> tuple[dict, list[dict]]:
  """(summary, per-example rows) for examples given as their choices' log-likelihoods and the gold index.

  Summary metrics, each with '<name>_stderr' by bootstrap over examples: 'acc' (argmax log-lik), 'acc_norm'
  (log-lik / characters, needs char_lengths), 'acc_bytes' (/ UTF-8 bytes, needs byte_lengths), 'acc_mutual_info'
  (log-lik minus the unconditional log-lik of the choice alone, needs unconditional), 'brier' (mean over examples
  of sum_j (p_j - y_j)^2) and 'ece' (`calibration` of the max probability; its reliability diagram under
  'reliability'). Rows: 'label', 'pred', 'correct', 'probs' and the pred_* of the other accuracies.
  """
  logliks_NC, valid_NC = _padded(logliks, 'logliks', np.float64)
  labels_N = np.asarray(labels)
  n_choices_N = valid_NC.sum(axis=1)
  if (labels_N.shape != (len(logliks_NC),) or not np.issubdtype(labels_N.dtype, np.integer)
      or np.any(labels_N < 0) or np.any(labels_N >= n_choices_N)):
    raise ValueError(f'labels must hold one index per example within its {n_choices_N.tolist()} choices; '
                     f'got {np.asarray(labels).tolist()}')
  scores = {'acc': logliks_NC}
  for name, arg, lengths in (('acc_norm', 'char_lengths', char_lengths), ('acc_bytes', 'byte_lengths', byte_lengths)):
    if lengths is not None:
      scores[name] = logliks_NC / _matching(lengths, valid_NC, arg, positive=True)
  if unconditional is not None:
    scores['acc_mutual_info'] = logliks_NC - _matching(unconditional, valid_NC, 'unconditional')
  preds = {name: np.argmax(np.where(valid_NC, s_NC, -np.inf), axis=1) for name, s_NC in scores.items()}
  correct = {name: (pred_N == labels_N).astype(np.float64) for name, pred_N in preds.items()}

  probs_NC = np.exp(logliks_NC - np.max(np.where(valid_NC, logliks_NC, -np.inf), axis=1, keepdims=True))
  probs_NC = np.where(valid_NC, probs_NC, 0.0)
  probs_NC /= probs_NC.sum(axis=1, keepdims=True)
  onehot_NC = np.arange(valid_NC.shape[1])[None, :] == labels_N[:, None]
  brier_N = np.sum(np.square(probs_NC - onehot_NC), axis=1)
  confidence_N = probs_NC.max(axis=1)

  summary = {'n': len(labels_N)}
  for name, values_N in {**correct, 'brier': brier_N}.items():
    summary[name] = float(np.mean(values_N))
    summary[f'{name}_stderr'] = stats.bootstrap_stderr(values_N, n_boot=n_boot, seed=seed)
  reliability = calibration(confidence_N, correct['acc'], n_bins)
  summary['ece'] = reliability.pop('ece')
  edges = np.asarray(reliability['edges'])
  ece_of = lambda idx: _ece(confidence_N[idx], correct['acc'][idx], edges)
  summary['ece_stderr'] = stats.bootstrap_stderr(ece_of, n=len(labels_N), n_boot=n_boot, seed=seed)
  summary['reliability'] = reliability

  rows = []
  for i in range(len(labels_N)):
    row = {'label': int(labels_N[i]), 'pred': int(preds['acc'][i]), 'correct': bool(correct['acc'][i]),
           'probs': probs_NC[i, :n_choices_N[i]].tolist()}
    row.update({f'pred_{name[4:]}': int(pred_N[i]) for name, pred_N in preds.items() if name != 'acc'})
    rows.append(row)
  return summary, rows


def _binned(confidence_N, correct_N, edges):
  """Per-bin (count, sum of correct, sum of confidence); bin b holds edges[b] < p <= edges[b+1] (p = 0 in bin 0)."""
  n_bins = len(edges) - 1
  bin_N = np.clip(np.searchsorted(edges, confidence_N, side='left') - 1, 0, n_bins - 1)
  total = lambda weights_N=None: np.bincount(bin_N, weights_N, minlength=n_bins).astype(np.float64)
  return total(), total(correct_N), total(confidence_N)


def _ece(confidence_N, correct_N, edges) -> float:
  """sum_b n_b/n |acc_b - conf_b|, which is sum_b |sum of correct - sum of confidence| / n."""
  _, accuracy_sums, confidence_sums = _binned(confidence_N, correct_N, edges)
  return float(np.sum(np.abs(accuracy_sums - confidence_sums)) / len(confidence_N))


def _padded(ragged, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
  """[N, C] values (0 past each example's end) and the mask of real entries, from per-example sequences."""
  rows = [np.asarray(r, dtype) for r in ragged]
  if not rows or any(r.ndim != 1 or not len(r) for r in rows):
    raise ValueError(f'{name} must be a non-empty list of non-empty per-example sequences (one value per choice)')
  width = max(len(r) for r in rows)
  values_NC, valid_NC = np.zeros((len(rows), width), dtype), np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    values_NC[i, :len(r)], valid_NC[i, :len(r)] = r, True
  return values_NC, valid_NC


def _matching(ragged, valid_NC, name: str, positive: bool = False) -> np.ndarray:
  """A per-choice companion of the log-likelihoods, padded like them (with 1 past each end)."""
  values_NC, mask_NC = _padded(ragged, name, np.float64)
  if mask_NC.shape != valid_NC.shape or np.any(mask_NC != valid_NC):
    raise ValueError(f'{name} must give one value per choice of every example, like logliks')
  if positive and np.any(values_NC[valid_NC] <= 0):
    raise ValueError(f'{name} must be positive (an empty choice string cannot be length-normalised)')
  return np.where(valid_NC, values_NC, 1.0)
