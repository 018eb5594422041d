"""The loop's pure parts on constructed inputs, against hand-computed values: the gate, scorers, selection and the
addition problems."""
import numpy as np
import pytest

from lmlab.eval import stats
from lmlab.improve import addition, gate, scorers, select


def test_gate_accepts_a_real_improvement_and_says_nothing_against_it():
  current = [1.0] * 40 + [0.0] * 60          # 40% right
  candidate = [1.0] * 70 + [0.0] * 30        # the same 40 right plus 30 more: 70%
  decision = gate.decide(candidate, current, n_boot=500, seed=0)
  assert decision['accepted'] and decision['reasons'] == []
  assert decision['heldout']['difference'] == pytest.approx(0.3)
  assert decision['heldout']['ci_low'] > 0
  assert decision['heldout']['a_only'] == 30 and decision['heldout']['b_only'] == 0


def test_gate_rejects_a_candidate_trained_on_wrong_labels():
  """A candidate that unlearned: right on fewer examples than the current model."""
  rng = np.random.default_rng(0)
  current = (rng.random(200) < 0.6).astype(float)
  candidate = current * (rng.random(200) < 0.5)  # loses half of what the current model got right
  decision = gate.decide(list(candidate), list(current), n_boot=500, seed=0)
  assert not decision['accepted']
  assert decision['heldout']['ci_high'] < 0
  assert 'interval [-' in decision['reasons'][0] and 'does not lie above 0' in decision['reasons'][0]


def test_gate_rejects_a_gain_whose_interval_touches_zero_and_one_that_breaks_a_guard():
  current = [0.0] * 100
  candidate = [1.0] + [0.0] * 99              # one more right out of 100: the interval includes 0
  decision = gate.decide(candidate, current, n_boot=1000, seed=0)
  expected = stats.paired_comparison(candidate, current, n_boot=1000, seed=0)
  assert decision['heldout'] == expected and expected['ci_low'] <= 0 < expected['ci_high']
  assert not decision['accepted']
  big_gain = [1.0] * 50 + [0.0] * 50
  guards = [gate.Guard('in_distribution_accuracy', current=0.90, candidate=0.80, tolerance=0.05),
            gate.Guard('perplexity', current=10.0, candidate=10.4, tolerance=0.5, higher_is_better=False)]
  decision = gate.decide(big_gain, current, guards, n_boot=500)
  assert not decision['accepted'] and len(decision['reasons']) == 1
  assert 'in_distribution_accuracy regressed by 0.1000' in decision['reasons'][0]
  assert [g['passed'] for g in decision['guards']] == [False, True]
  assert decision['guards'][1]['regression'] == pytest.approx(0.4)


def _samples(texts_per_prompt, answers=None):
  out = []
  for p, texts in enumerate(texts_per_prompt):
    for k, t in enumerate(texts):
      out.append({'sample_id': f'1:{p}:{k}', 'prompt_id': f'1:{p}', 'question': f'q{p}', 'text': t,
                  'answer': None if answers is None else answers[p]})
  return out


def test_majority_vote_verifier_and_rules_by_hand():
  samples = _samples([['12', '12', '13', ' 12 '], ['7', '8', '9', 'x']], answers=['12', '9'])
  rules = scorers.Rules(('majority', 'format'), min_share=0.6, format_regex=r'\d+')
  rows = scorers.score(samples, rules)
  # prompt 0: '12' holds 3 of 4 votes (0.75 >= 0.6); prompt 1: a four-way tie goes to the first, '7', with 0.25
  assert [r['reward'] for r in rows] == [1, 1, 0, 1, 0, 0, 0, 0]
  assert rows[4]['vote'] == '7' and rows[4]['vote_share'] == 0.25
  verified = scorers.score(samples, scorers.Rules(('verifier', 'length'), max_chars=1))
  assert [r['reward'] for r in verified] == [0, 0, 0, 0, 0, 0, 1, 0]  # '12' is too long; '9' is right and short
  assert scorers.exact('0001', '1') == 0.0  # reversed sums: no numeric leniency
  with pytest.raises(ValueError, match='verifier needs a reference answer'):
    scorers.score(_samples([['1']]), scorers.Rules(('verifier',)))
  with pytest.raises(ValueError, match='improve.scorers'):
    scorers.Rules(('bleu',))


def test_rejection_sampling_keeps_at_most_m_distinct_passing_texts_and_dpo_pairs_best_with_worst():
  samples = _samples([['5', '5', '6', '7'], ['1', '2']])
  scores = [{'sample_id': s['sample_id'], 'reward': r} for s, r in zip(samples, [1.0, 1.0, 0.9, 0.2, 0.1, 0.3])]
  rows = select.rejection(samples, scores, threshold=0.9, per_prompt=2)
  assert [(r['prompt'], r['response']) for r in rows] == [('q0', '5'), ('q0', '6')]  # '5' once, then '6'; q1 none
  assert len(select.rejection(samples, scores, threshold=0.9, per_prompt=1)) == 1
  pairs = select.preference_pairs(samples, scores, margin=0.5)
  assert [(p['chosen'], p['rejected']) for p in pairs] == [('5', '7')]  # q1's margin 0.2 is too small


def test_reversed_additions_are_right_distinct_and_padded():
  rows = addition.problems([1, 3], 40, seed=0, width=5)
  assert len(rows) == 80 and len({r['prompt'] for r in rows}) == 80
  for r in rows:
    a, b = (int(x[::-1]) for x in r['prompt'].rstrip('=').split('+'))
    assert int(r['answer'][::-1]) == a + b and len(r['answer']) == 6
    assert max(len(str(a)), len(str(b))) == r['digits'] and len(r['prompt']) == 12
  for r in addition.problems([2], 20, seed=1):  # unpadded: the sum as written, reversed
    a, b = (int(x[::-1]) for x in r['prompt'].rstrip('=').split('+'))
    assert r['answer'] == str(a + b)[::-1]
  assert addition.problems([2], 5, seed=1) == addition.problems([2], 5, seed=1)
  plain = addition.problems([2], 20, seed=1, notation='plain', question='What is {a} + {b}?')
  for r, reversed_row in zip(plain, addition.problems([2], 20, seed=1)):  # the same draws, written the usual way
    a, b = (int(x) for x in r['prompt'].removeprefix('What is ').rstrip('?').split(' + '))
    assert r['answer'] == str(a + b) and reversed_row['prompt'] == f'{str(a)[::-1]}+{str(b)[::-1]}='
  with pytest.raises(ValueError, match='pad_to'):
    addition.problems([4], 1, seed=0, width=3)
