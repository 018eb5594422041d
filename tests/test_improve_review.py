"""The review page through Flask's test client: it lists the latest samples escaped, each action appends one
validated feedback row, and with a token every request without it is refused."""
import json
import os

import pytest

pytest.importorskip('flask')

from lmlab.improve import feedback, records, review  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def workdir(tmp_path):
  samples = [{'sample_id': f'2:0:{k}', 'prompt_id': '2:0', 'question': '12+34=', 'text': t, 'answer': '46'}
             for k, t in enumerate(['46', '<script>alert(1)</script>'])]
  records.write_jsonl(str(tmp_path / 'iterations' / '1' / 'samples.jsonl'), [])
  records.write_jsonl(str(tmp_path / 'iterations' / '2' / 'samples.jsonl'), samples)
  return str(tmp_path)


def _rows(workdir):
  path = os.path.join(workdir, 'feedback', 'review.jsonl')
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_page_shows_the_latest_iteration_with_model_text_escaped(workdir):
  page = review.create_app(workdir).test_client().get('/').get_data(as_text=True)
  assert 'Iteration 2' in page and '12+34=' in page
  assert '<script>alert(1)</script>' not in page and '&lt;script&gt;alert(1)&lt;/script&gt;' in page


def test_each_action_appends_one_row_that_feedback_loading_accepts(workdir):
  client = review.create_app(workdir).test_client()
  assert client.post('/feedback', data={'kind': 'rating', 'sample_id': '2:0:1', 'rating': '2',
                                        'annotator': 'ann'}).status_code == 302
  assert client.post('/feedback', data={'kind': 'preference', 'sample_ids': ['2:0:0', '2:0:1'],
                                        'preferred': '2:0:0', 'annotator': 'bob'}).status_code == 302
  # A browser sends a textarea's line breaks as CRLF; the row keeps the sample's LF.
  assert client.post('/feedback', data={'kind': 'correction', 'sample_id': '2:0:1', 'corrected_text': '4\r\n6',
                                        'annotator': 'ann'}).status_code == 302
  rows = _rows(workdir)
  assert [(r.get('rating'), r.get('preferred'), r.get('corrected_text')) for r in rows] == \
      [(2, None, None), (None, '2:0:0', None), (None, None, '4\n6')]
  fb = feedback.load(os.path.join(workdir, 'feedback'))
  assert fb.ratings == {'2:0:1': {'ann': 2}} and fb.preferences == {('2:0:0', '2:0:1'): '2:0:0'}
  assert fb.corrections == {'2:0:1': '4\n6'}
  bad = client.post('/feedback', data={'kind': 'rating', 'sample_id': '2:0:1', 'rating': '9', 'annotator': 'ann'})
  assert bad.status_code == 400 and 'integer from 1 to 5' in bad.get_data(as_text=True)
  unknown = client.post('/feedback', data={'kind': 'rating', 'sample_id': '1:0:0', 'rating': '3', 'annotator': 'a'})
  assert unknown.status_code == 400 and len(_rows(workdir)) == 3


def test_a_token_is_checked_on_every_request(workdir):
  client = review.create_app(workdir, token='s3cret').test_client()
  assert client.get('/').status_code == 403
  assert client.get('/?token=wrong').status_code == 403
  assert client.post('/feedback', data={'kind': 'rating', 'sample_id': '2:0:0', 'rating': '5',
                                        'annotator': 'ann'}).status_code == 403
  assert _rows(workdir) == []
  assert client.get('/', headers={'X-Review-Token': 's3cret'}).status_code == 200
  assert client.post('/feedback', data={'kind': 'rating', 'sample_id': '2:0:0', 'rating': '5', 'annotator': 'ann',
                                        'token': 's3cret'}).status_code == 302
  assert len(_rows(workdir)) == 1


def test_serving_off_the_local_host_needs_a_token(workdir):
  with pytest.raises(ValueError, match='pass --token=SECRET'):
    review.server(workdir, host='0.0.0.0', port=0)
