"""Multiple-choice metrics (accuracies, Brier, ECE and its reliability diagram) on hand-computed examples, and
answer extraction / exact match for generative tasks rule by rule."""
import math

import numpy as np
import pytest

from lmlab.eval import answers, choice_metrics, stats

# Two examples, hand-checked below: 2 and 3 choices (ragged), ties in acc_bytes (example 0) and acc (example 1).
LOGLIKS = [[-2.0, -3.0], [-1.0, -1.0, -5.0]]
LABELS = [1, 0]
CHARS = [[2, 6], [1, 1, 1]]            # acc_norm: [-1.0, -0.5] -> 1; [-1, -1, -5] -> 0 (tie, first)
BYTES = [[4, 6], [1, 1, 1]]            # acc_bytes: [-0.5, -0.5] -> 0 (tie, first)
UNCONDITIONAL = [[-3.0, -1.0], [-0.5, -0.2, -1.0]]  # mutual info: [1, -2] -> 0; [-0.5, -0.8, -4] -> 0


def test_accuracies_brier_and_ece_by_hand():
  summary, rows = choice_metrics.multiple_choice_metrics(LOGLIKS, LABELS, CHARS, BYTES, UNCONDITIONAL, n_boot=200)
  assert (summary['acc'], summary['acc_norm'], summary['acc_bytes'], summary['acc_mutual_info']) == (0.5, 1, 0.5, 0.5)
  p0 = 1 / (1 + math.exp(-1))                         # softmax([-2, -3])[0]
  q = 1 / (2 + math.exp(-4))                          # softmax([-1, -1, -5])[0] = [1]
  brier0 = p0 ** 2 + (1 - p0 - 1) ** 2                # label 1
  brier1 = (q - 1) ** 2 + q ** 2 + (1 - 2 * q) ** 2   # label 0
  assert summary['brier'] == pytest.approx((brier0 + brier1) / 2, abs=1e-12)
  # Confidences p0 = 0.731 (wrong, bin 10 of 15) and q = 0.495 (right, bin 7): each bin holds half the examples.
  assert summary['ece'] == pytest.approx(0.5 * abs(0 - p0) + 0.5 * abs(1 - q), abs=1e-12)
  reliability = summary['reliability']
  assert reliability['counts'] == [0] * 7 + [1, 0, 0, 1] + [0] * 4
  assert reliability['accuracy'][7] == 1.0 and reliability['accuracy'][10] == 0.0
  assert reliability['confidence'][7] == pytest.approx(q) and reliability['confidence'][10] == pytest.approx(p0)
  assert reliability['accuracy'][0] is None and len(reliability['edges']) == 16
  assert rows[0] == {'label': 1, 'pred': 0, 'correct': False, 'probs': pytest.approx([p0, 1 - p0]), 'pred_norm': 1,
                     'pred_bytes': 0, 'pred_mutual_info': 0}
  assert rows[1]['pred'] == 0 and rows[1]['correct'] and rows[1]['probs'] == pytest.approx([q, q, 1 - 2 * q])
  assert summary['n'] == 2


def test_only_the_metrics_the_inputs_allow():
  summary, rows = choice_metrics.multiple_choice_metrics(LOGLIKS, LABELS, n_boot=50)
  assert not {'acc_norm', 'acc_bytes', 'acc_mutual_info'} & set(summary)
  assert set(rows[0]) == {'label', 'pred', 'correct', 'probs'}


def test_choice_lengths_count_characters_and_utf8_bytes():
  assert choice_metrics.choice_lengths(['abc', 'naïve', '日本']) == ([3, 5, 2], [3, 6, 6])


def _ece_by_loop(confidence, correct, n_bins=15):
  """ECE written out: bins (b/n_bins, (b+1)/n_bins], the first also holding 0."""
  total = 0.0
  for b in range(n_bins):
    lo, hi = b / n_bins, (b + 1) / n_bins
    members = [i for i, p in enumerate(confidence) if (lo < p <= hi) or (b == 0 and p == 0)]
    if members:
      acc = sum(correct[i] for i in members) / len(members)
      conf = sum(confidence[i] for i in members) / len(members)
      total += len(members) / len(confidence) * abs(acc - conf)
  return total


def test_ece_and_stderrs_match_direct_computations():
  rng = np.random.default_rng(0)
  logliks = [rng.normal(size=rng.integers(2, 6)) * 2 for _ in range(120)]
  labels = [int(rng.integers(0, len(l))) for l in logliks]
  summary, rows = choice_metrics.multiple_choice_metrics(logliks, labels, n_boot=200, seed=3)
  confidence = np.array([max(r['probs']) for r in rows])
  correct = np.array([float(r['correct']) for r in rows])
  assert summary['ece'] == pytest.approx(_ece_by_loop(confidence, correct), abs=1e-12)
  assert summary['acc_stderr'] == stats.bootstrap_stderr(correct, n_boot=200, seed=3)
  expected = stats.bootstrap_stderr(lambda idx: _ece_by_loop(confidence[idx], correct[idx]), n=120, n_boot=200, seed=3)
  assert summary['ece_stderr'] == pytest.approx(expected, abs=1e-12) and expected > 0


def test_calibration_bins_are_closed_on_the_right():
  result = choice_metrics.calibration([0.5, 0.5 + 1e-9, 1.0, 0.0], [1, 0, 1, 0], n_bins=4)
  assert result['counts'] == [1, 1, 1, 1]  # 0 -> bin 0, 0.5 -> (0.25, 0.5], 0.5+ -> (0.5, 0.75], 1 -> (0.75, 1]
  assert result['ece'] == pytest.approx((0 + 0.5 + (0.5 + 1e-9) + 0) / 4)


def test_brier_matches_lm_eval():
  metrics = pytest.importorskip('lm_eval.api.metrics', reason='lm-eval not installed')
  logliks = [[-1.0, -2.0, -0.5], [-3.0, -0.1, -2.0], [-0.7, -0.7, -0.9]]
  labels = [2, 0, 1]
  summary, rows = choice_metrics.multiple_choice_metrics(logliks, labels, n_boot=50)
  expected = metrics.brier_score([(g, np.array(r['probs'])) for g, r in zip(labels, rows)])
  assert summary['brier'] == pytest.approx(expected, abs=1e-12)


def test_bad_choice_inputs_are_refused():
  with pytest.raises(ValueError, match='labels must hold one index per example within its'):
    choice_metrics.multiple_choice_metrics(LOGLIKS, [2, 0])
  with pytest.raises(ValueError, match='char_lengths must give one value per choice'):
    choice_metrics.multiple_choice_metrics(LOGLIKS, LABELS, char_lengths=[[1, 2], [1, 1]])
  with pytest.raises(ValueError, match='byte_lengths must be positive'):
    choice_metrics.multiple_choice_metrics(LOGLIKS, LABELS, byte_lengths=[[0, 2], [1, 1, 1]])
  with pytest.raises(ValueError, match='non-empty per-example sequences'):
    choice_metrics.multiple_choice_metrics([[], [-1.0]], [0, 0])


# ---- answers


@pytest.mark.parametrize('text, expected', [
    ('3 + 4 = 7 so she has 7.\n#### 7', '7'), ('#### 1,000.', '1,000.'), ('#### -5 apples', '-5'),
    ('#### 3 and later #### 4', '3'), ('The answer is 7', None), ('####7', None)])
def test_strict_extraction_takes_the_first_gsm8k_answer(text, expected):
  assert answers.extract_strict(text) == expected


def test_strict_extraction_agrees_with_lm_eval_regex_filter():
  extraction = pytest.importorskip('lm_eval.filters.extraction', reason='lm-eval not installed')
  texts = ['so 3 + 4 = 7\n#### 7', 'no marker here', '#### 1,000.', '#### -2.5 and #### 3', ' #### 12 ']
  expected = extraction.RegexFilter().apply([texts], [{}])[0]
  assert [answers.extract_strict(t) or '[invalid]' for t in texts] == expected


def test_strict_extraction_with_a_caller_pattern():
  assert answers.extract_strict('The answer is (B).', r'answer is \(([A-D])\)') == 'B'
  assert answers.extract_strict('Final: C', r'[A-D]$') == 'C'  # no group: the whole match
  assert answers.extract_strict('D', r'\(([A-D])\)|^([A-D])$') == 'D'  # the first group that took part
  assert answers.extract_strict('nothing', r'answer is (\w+)') is None


@pytest.mark.parametrize('text, expected', [
    ('I have 5 apples, then 12 pears.', '12'), ('Total: $1,234.50.', '1,234.50'), ('It is -3', '-3'),
    ('pick 1,2', '2'), ('1,000,000 people', '1,000,000'), ('pi is 3.14.', '3.14'), ('no numbers', None),
    ('from 3-4', '-4'), ('12,3456', '3456')])
def test_flexible_extraction_takes_the_last_number(text, expected):
  assert answers.extract_flexible(text) == expected


@pytest.mark.parametrize('answer, reference, expected', [
    ('1,000', '1000.0', True), ('$1000.', '1000', True), (' 42 ', '42', True), ('-0', '0', True),
    ('0.1', '0.10001', False), ('12', '12.5', False), ('1,000', 'one thousand', False),
    ('The  Answer.', 'the answer', True), ('Paris', 'paris!', False), (None, '7', False), ('', '', True)])
def test_answers_match_rules(answer, reference, expected):
  assert answers.answers_match(answer, reference) is expected


def test_exact_match_over_rows():
  outputs = ['She pays 3 * 24 = 72 dollars.\n#### 72', 'The answer is 72.', '#### 71', 'About 72,000 total']
  references = ['72', '72', '72', '72000']
  assert answers.exact_match(outputs, references, 'strict') == [1.0, 0.0, 0.0, 0.0]
  assert answers.exact_match(outputs, references, 'flexible') == [1.0, 1.0, 0.0, 1.0]
  per_row = [None, r'answer is (\d+)', None, r'About ([\d,]+)']
  assert answers.exact_match(outputs, references, 'strict', per_row) == [1.0, 1.0, 0.0, 1.0]


def test_bad_answer_settings_are_refused():
  with pytest.raises(ValueError, match="mode 'loose' is not one of strict, flexible"):
    answers.extract_answer('1', 'loose')
  with pytest.raises(ValueError, match='is not a valid regular expression'):
    answers.extract_strict('1', '(')
  with pytest.raises(ValueError, match='2 outputs but 1 references'):
    answers.exact_match(['1', '2'], ['1'])
  with pytest.raises(ValueError, match='3 patterns for 2 outputs'):
    answers.exact_match(['1', '2'], ['1', '2'], patterns=[None] * 3)
  with pytest.raises(ValueError, match='strict extraction only'):
    answers.extract_answer('1', 'flexible', r'\d')
