"""Human feedback files: validation with FILE:LINE, the conflict rule, overrides of the automated reward, agreement."""
import json

import pytest

from lmlab.improve import feedback, scorers, select


def _write(path, rows):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))


def _samples():
  """Prompt 0 with a right and a wrong sample, prompt 1 with two wrong ones."""
  rows = []
  for p, (answer, texts) in enumerate([('579', ['579', '578']), ('12', ['21', '13'])]):
    for k, t in enumerate(texts):
      rows.append({'sample_id': f'1:{p}:{k}', 'prompt_id': f'1:{p}', 'question': f'q{p}', 'answer': answer, 'text': t})
  return rows


@pytest.mark.parametrize('line, message', [
    ('{"sample_id": "1:0:0", "rating": 6, "annotator": "ann", "time": "2026-11-30T10:00:00Z"}', 'integer from 1 to 5'),
    ('{"sample_id": "1:0:0", "rating": 4, "time": "2026-11-30T10:00:00Z"}', '"annotator" must be'),
    ('{"sample_id": "1:0:0", "rating": 4, "annotator": "ann", "time": "yesterday"}', 'is not ISO 8601'),
    ('{"sample_ids": ["1:0:0", "1:0:1"], "preferred": "1:0:7", "annotator": "a", "time": "2026-11-30T10:00:00"}',
     '"preferred" must be one of'),
    ('{"sample_id": "1:0:0", "annotator": "a", "time": "2026-11-30T10:00:00"}', 'not a rating'),
    ('{"sample_id": "1:0:0", "rating": 4,', 'malformed JSON'),
])
def test_malformed_feedback_is_reported_with_file_and_line(tmp_path, line, message):
  good = {'sample_id': '1:0:1', 'rating': 2, 'annotator': 'ann', 'time': '2026-11-30T09:00:00Z'}
  _write(tmp_path / 'a.jsonl', [good, '', line])
  with pytest.raises(ValueError, match=f'{tmp_path / "a.jsonl"}:3: .*{message}'):
    feedback.load(str(tmp_path))


def test_latest_row_per_annotator_then_mean_and_majority_across_annotators(tmp_path):
  _write(tmp_path / 'a.jsonl', [
      {'sample_id': '1:0:1', 'rating': 1, 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'},
      {'sample_id': '1:0:1', 'rating': 5, 'annotator': 'ann', 'time': '2026-11-30T09:00:00Z'},  # older: loses
      {'sample_ids': ['1:0:0', '1:0:1'], 'preferred': '1:0:0', 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'},
      {'sample_ids': ['1:1:0', '1:1:1'], 'preferred': '1:1:0', 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'}])
  _write(tmp_path / 'b.jsonl', [
      {'sample_id': '1:0:1', 'rating': 4, 'annotator': 'bob', 'time': '2026-11-30T08:00:00Z'},
      {'sample_ids': ['1:0:1', '1:0:0'], 'preferred': '1:0:0', 'annotator': 'bob', 'time': '2026-11-30T10:00:00Z'},
      {'sample_ids': ['1:1:0', '1:1:1'], 'preferred': '1:1:1', 'annotator': 'bob', 'time': '2026-11-30T10:00:00Z'},
      {'sample_id': '1:1:0', 'corrected_text': '12', 'annotator': 'bob', 'time': '2026-11-30T10:00:00Z'},
      {'sample_id': '1:1:0', 'corrected_text': '31', 'annotator': 'ann', 'time': '2026-11-30T11:00:00+01:00'}])
  fb = feedback.load(str(tmp_path))
  assert fb.ratings == {'1:0:1': {'ann': 1, 'bob': 4}}
  assert feedback.human_reward(fb.ratings['1:0:1']) == pytest.approx((0 + 0.75) / 2)
  assert fb.preferences == {('1:0:0', '1:0:1'): '1:0:0'}  # two votes to none; the 1:1 pair is a tie: dropped
  assert fb.corrections == {'1:1:0': '31'}  # ann's 11:00+01:00 is 10:00 UTC, as old as bob's, and read later
  pairs = feedback.preferences_as_pairs(str(tmp_path), _samples())
  assert [(p['chosen'], p['rejected']) for p in pairs] == [('579', '578')]
  assert [(r['prompt'], r['response']) for r in feedback.corrections_as_sft(str(tmp_path), _samples())] == \
      [('q1', '31')]


def test_a_human_rating_overrides_the_verifier_and_changes_what_is_selected(tmp_path):
  samples = _samples()
  automated = scorers.score(samples, scorers.Rules(('verifier',)))
  assert [r['reward'] for r in automated] == [1, 0, 0, 0]
  _write(tmp_path / 'r.jsonl', [
      {'sample_id': '1:0:0', 'rating': 1, 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'},   # verifier: right
      {'sample_id': '1:1:1', 'rating': 5, 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'},   # verifier: wrong
      {'sample_id': '1:1:1', 'rating': 5, 'annotator': 'bob', 'time': '2026-11-30T10:00:00Z'},
      {'sample_id': '1:0:1', 'rating': 2, 'annotator': 'bob', 'time': '2026-11-30T10:00:00Z'}])
  judged = feedback.apply(automated, feedback.load(str(tmp_path)))
  assert [r['reward'] for r in judged] == [0.0, 0.25, 0, 1.0]
  assert [r['source'] for r in judged] == ['human', 'human', 'automated', 'human']
  assert [r['response'] for r in select.rejection(samples, judged, 1.0, 1)] == ['13']
  agreement = feedback.agreement(judged)
  # people say bad, bad, good where the verifier says good, bad, bad: agreement 1/3; kappa by hand below
  assert agreement['rated_samples'] == 3
  assert agreement['human_vs_automated']['agreement'] == pytest.approx(1 / 3)
  chance = (1 / 3) * (1 / 3) + (2 / 3) * (2 / 3)
  assert agreement['human_vs_automated']['kappa'] == pytest.approx((1 / 3 - chance) / (1 - chance))
  assert agreement['between_annotators'] == {'ann|bob': {'n': 1, 'agreement': 1.0, 'kappa': None}}


def test_cohen_kappa_matches_the_textbook_example():
  # 50 items: both yes 20, a yes b no 5, a no b yes 10, both no 15 (Wikipedia's example): kappa 0.4
  a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
  b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
  assert feedback.cohen_kappa(a, b) == pytest.approx(0.4)


def test_append_validates_and_writes_one_line(tmp_path):
  row = {'sample_id': '1:0:0', 'rating': 3, 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'}
  feedback.append(str(tmp_path), row)
  feedback.append(str(tmp_path), {**row, 'rating': 4})
  assert [json.loads(x)['rating'] for x in (tmp_path / 'review.jsonl').read_text().splitlines()] == [3, 4]
  with pytest.raises(ValueError, match='integer from 1 to 5'):
    feedback.append(str(tmp_path), {**row, 'rating': 0})
