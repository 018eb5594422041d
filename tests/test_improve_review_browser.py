"""The review page on its real server (review.server, what experiments.review runs) in headless Chromium: it opens only
with the token, model text stays text, each click appends exactly its feedback row, and nothing loads from elsewhere."""
import datetime
import glob
import os
import threading
import urllib.parse

import pytest

pytest.importorskip('flask')

import browser  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.improve import feedback, records, review  # pylint: disable=g-import-not-at-top,wrong-import-position

TOKEN = 's3cret'
SAMPLES = [  # prompt 2:0 has two samples (a preference pick), 2:1 one; texts as a model might write them
    {'sample_id': '2:0:0', 'prompt_id': '2:0', 'question': '12+34=', 'text': '46', 'answer': '46'},
    {'sample_id': '2:0:1', 'prompt_id': '2:0', 'question': '12+34=', 'answer': '46',
     'text': '<script>window.__pwned=1</script>\n<b>bold</b> 45'},
    {'sample_id': '2:1:0', 'prompt_id': '2:1', 'question': '24+34=', 'text': '\n58', 'answer': '58'},
]


@pytest.fixture(scope='module')
def chromium():
  with browser.chromium() as b:
    yield b


@pytest.fixture
def served(tmp_path):
  """(workdir, page address without a query) of a token-guarded server on a free port, in a thread."""
  records.write_jsonl(str(tmp_path / 'iterations' / '1' / 'samples.jsonl'), [{**SAMPLES[0], 'sample_id': '1:0:0'}])
  records.write_jsonl(str(tmp_path / 'iterations' / '2' / 'samples.jsonl'), SAMPLES)
  httpd = review.server(str(tmp_path), port=0, token=TOKEN)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield str(tmp_path), f'http://127.0.0.1:{httpd.port}/'
  finally:
    httpd.shutdown()
    thread.join()


@pytest.fixture
def browsing(chromium):
  """(a fresh page, the list of every URL it has requested so far)."""
  context = chromium.new_context()
  requested = []
  context.on('request', lambda request: requested.append(request.url))
  try:
    yield context.new_page(), requested
  finally:
    context.close()


def _address(url, **query):
  return f'{url}?{urllib.parse.urlencode(query)}'


def _rows(workdir):
  return [row for path in sorted(glob.glob(os.path.join(workdir, 'feedback', '*.jsonl')))
          for row in records.read_jsonl(path)]


def _all_local(requested):
  return requested and {urllib.parse.urlsplit(u).hostname for u in requested} == {'127.0.0.1'}


def test_the_page_opens_with_the_token_and_shows_model_text_as_text(served, browsing):
  _, url = served
  page, requested = browsing
  response = page.goto(_address(url, token=TOKEN))
  assert response.status == 200
  assert page.locator('h1').inner_text() == 'Iteration 2: 2 prompts'
  questions = page.locator('h3')
  assert questions.all_inner_texts() == ['12+34=', '24+34='] and all(q.is_visible() for q in questions.all())
  # Every character of each sample, newlines included, is shown and is in its correction box to edit.
  shown = page.locator('pre.text')
  assert shown.all_inner_texts() == [s['text'] for s in SAMPLES] and all(pre.is_visible() for pre in shown.all())
  assert [box.input_value() for box in page.locator('[name=corrected_text]').all()] == [s['text'] for s in SAMPLES]
  assert page.locator('script, b').count() == 0  # the page has no script of its own; model text made no elements
  assert page.evaluate('typeof window.__pwned') == 'undefined'
  assert _all_local(requested), requested


def test_each_click_appends_exactly_its_row(served, browsing):
  workdir, url = served
  page, requested = browsing
  page.goto(_address(url, token=TOKEN, annotator='ann'))
  start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  edited = '24 + 34\n= 58'
  actions = [  # (kind, what the reviewer does, the row it must append apart from its time)
      ('rating', lambda: page.locator('[id="sample-2:0:1"] button[name=rating][value="2"]').click(),
       {'annotator': 'ann', 'sample_id': '2:0:1', 'rating': 2}),
      ('preference', lambda: page.locator('[id="prompt-2:0"] button[name=preferred]', has_text='second').click(),
       {'annotator': 'ann', 'sample_ids': ['2:0:0', '2:0:1'], 'preferred': '2:0:1'}),
      ('correction', lambda: (page.locator('[id="sample-2:1:0"] [name=corrected_text]').fill(edited),
                              page.locator('[id="sample-2:1:0"] button', has_text='correct').click()),
       {'annotator': 'ann', 'sample_id': '2:1:0', 'corrected_text': edited}),
  ]
  for n, (kind, act, expected) in enumerate(actions, 1):
    with page.expect_navigation() as navigation:
      act()
    # Each save comes back to the page with the token and annotator kept, so the next click is accepted too.
    assert navigation.value.status == 200 and page.locator('#message').inner_text() == f'saved {kind}'
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query) == {
        'token': [TOKEN], 'annotator': ['ann'], 'message': [f'saved {kind}']}
    rows = _rows(workdir)
    assert len(rows) == n and {k: v for k, v in rows[-1].items() if k != 'time'} == expected
    assert start <= datetime.datetime.fromisoformat(rows[-1]['time']) <= datetime.datetime.now(datetime.timezone.utc)
  fb = feedback.load(os.path.join(workdir, 'feedback'))
  assert fb.ratings == {'2:0:1': {'ann': 2}} and fb.preferences == {('2:0:0', '2:0:1'): '2:0:1'}
  assert fb.corrections == {'2:1:0': edited}
  assert _all_local(requested), requested


def test_without_the_right_token_the_page_and_its_forms_are_refused(served, browsing):
  workdir, url = served
  page, requested = browsing
  assert page.goto(url).status == 403
  assert page.goto(_address(url, token='wrong')).status == 403
  assert page.goto(_address(url, token='')).status == 403
  # A page opened with the token whose forms then lose it, or carry a wrong one, saves nothing.
  for tamper in ('els => els.forEach(e => e.remove())', 'els => els.forEach(e => { e.value = "wrong"; })'):
    page.goto(_address(url, token=TOKEN))
    page.locator('input[name=token]').evaluate_all(tamper)
    with page.expect_navigation() as navigation:
      page.locator('[id="sample-2:0:0"] button[name=rating][value="5"]').click()
    assert navigation.value.status == 403
  assert _rows(workdir) == [] and not os.path.exists(os.path.join(workdir, 'feedback'))
  assert _all_local(requested), requested
