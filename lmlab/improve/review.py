"""The review page (Flask) for the loop's latest samples; experiments/review.py serves it.

Reviewers rate a sample (1-5), pick the better of two samples of a prompt, or correct one; each action appends one
validated row to DIR/feedback/review.jsonl in a single append (two reviewers may write at once). Serves 127.0.0.1
by default; any other host needs a token, which every request must carry (?token=, a form field or the
X-Review-Token header). Model text is escaped by Jinja's autoescaping.
"""
import datetime
import hmac
import os

from lmlab.improve import feedback, records

LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')

# Forms post without JavaScript. A correction is edited in a <textarea>, since an <input> strips newlines; HTML drops
# one newline right after <pre> and <textarea>, so each starts with one and a sample's own leading newline survives.
PAGE = '''<!doctype html>
<html><head><meta charset="utf-8"><title>Review: iteration {{ iteration }}</title>
<style>body{font-family:sans-serif;max-width:60em;margin:1em auto} .prompt{border:1px solid #ccc;padding:.5em;
margin:.5em 0} pre{background:#f4f4f4;padding:.3em;white-space:pre-wrap} form{display:inline-block;margin:.2em}</style>
</head><body>
<h1>Iteration {{ iteration }}: {{ groups|length }} prompts</h1>
{% if message %}<p id="message">{{ message }}</p>{% endif %}
{% for prompt_id, samples in groups %}
<div class="prompt" id="prompt-{{ prompt_id }}"><h3>{{ samples[0].question }}</h3>
{% for s in samples %}
<div class="sample" id="sample-{{ s.sample_id }}"><pre class="text">
{{ s.text }}</pre>
reward {{ '%.2f'|format(rewards.get(s.sample_id, 0)) }}
<form method="post" action="{{ url_for('feedback_row') }}">{{ hidden() }}
<input type="hidden" name="kind" value="rating"><input type="hidden" name="sample_id" value="{{ s.sample_id }}">
{% for r in range(1, 6) %}<button name="rating" value="{{ r }}">{{ r }}</button>{% endfor %}</form>
<form method="post" action="{{ url_for('feedback_row') }}">{{ hidden() }}
<input type="hidden" name="kind" value="correction"><input type="hidden" name="sample_id" value="{{ s.sample_id }}">
<textarea name="corrected_text" rows="3" cols="60">
{{ s.text }}</textarea><button>correct</button></form></div>
{% endfor %}
{% if samples|length > 1 %}
<form method="post" action="{{ url_for('feedback_row') }}">{{ hidden() }}
<input type="hidden" name="kind" value="preference">
<input type="hidden" name="sample_ids" value="{{ samples[0].sample_id }}">
<input type="hidden" name="sample_ids" value="{{ samples[1].sample_id }}">
better: <button name="preferred" value="{{ samples[0].sample_id }}">first</button>
<button name="preferred" value="{{ samples[1].sample_id }}">second</button></form>
{% endif %}</div>
{% endfor %}
</body></html>'''

HIDDEN = ('<input type="hidden" name="annotator" value="{{ annotator }}">'
          '{% if token %}<input type="hidden" name="token" value="{{ token }}">{% endif %}')


def latest_iteration(workdir: str) -> int:
  root = os.path.join(workdir, 'iterations')
  done = [int(n) for n in os.listdir(root) if n.isdigit() and os.path.isfile(os.path.join(root, n, 'samples.jsonl'))] \
      if os.path.isdir(root) else []
  if not done:
    raise ValueError(f'{workdir} has no iterations/<i>/samples.jsonl yet; run experiments.improve first')
  return max(done)


def create_app(workdir: str, token: str = ''):
  """The Flask app serving WORKDIR's latest iteration; with a token, every request must carry it."""
  import flask  # pylint: disable=g-import-not-at-top  (only the review page needs it)
  from markupsafe import Markup  # pylint: disable=g-import-not-at-top
  iteration = latest_iteration(workdir)
  directory = os.path.join(workdir, 'iterations', str(iteration))
  samples = records.read_jsonl(os.path.join(directory, 'samples.jsonl'))
  by_id = {s['sample_id']: s for s in samples}
  app = flask.Flask(__name__)

  @app.before_request
  def check_token():
    if not token:
      return None
    given = (flask.request.args.get('token') or flask.request.form.get('token') or
             flask.request.headers.get('X-Review-Token') or '')
    if not hmac.compare_digest(given.encode(), token.encode()):
      flask.abort(403)
    return None

  @app.get('/')
  def page():
    scores_path = os.path.join(directory, 'scores.jsonl')
    rewards = {r['sample_id']: r['reward'] for r in records.read_jsonl(scores_path)} \
        if os.path.isfile(scores_path) else {}
    groups = {}
    for s in samples:
      groups.setdefault(s['prompt_id'], []).append(s)
    annotator = flask.request.args.get('annotator', 'reviewer')
    hidden = lambda: Markup(flask.render_template_string(HIDDEN, annotator=annotator, token=token))
    return flask.render_template_string(PAGE, iteration=iteration, groups=list(groups.items()), rewards=rewards,
                                        hidden=hidden, message=flask.request.args.get('message', ''))

  @app.post('/feedback')
  def feedback_row():
    form = flask.request.form
    row = {'annotator': form.get('annotator', ''),
           'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    kind = form.get('kind')
    if kind == 'rating':
      row.update(sample_id=form.get('sample_id', ''), rating=int(form['rating']) if form.get('rating', '').isdigit()
                 else form.get('rating'))
    elif kind == 'preference':
      row.update(sample_ids=form.getlist('sample_ids'), preferred=form.get('preferred'))
    elif kind == 'correction':
      # Browsers send a textarea's line breaks as CRLF (the HTML form encoding); the sample's own are LF.
      row.update(sample_id=form.get('sample_id', ''),
                 corrected_text=form.get('corrected_text', '').replace('\r\n', '\n'))
    else:
      return flask.Response('kind must be rating, preference or correction\n', 400, mimetype='text/plain')
    ids = row.get('sample_ids') or [row.get('sample_id')]
    unknown = [i for i in ids if i not in by_id]
    if unknown:
      return flask.Response(f'unknown sample ids {unknown}: review the latest iteration\'s samples\n', 400,
                            mimetype='text/plain')
    try:
      feedback.append(os.path.join(workdir, 'feedback'), row)
    except ValueError as error:
      return flask.Response(f'{error}\n', 400, mimetype='text/plain')
    query = {'message': f'saved {kind}', 'annotator': row['annotator'], **({'token': token} if token else {})}
    return flask.redirect(flask.url_for('page', **query))

  return app


def server(workdir: str, host: str = '127.0.0.1', port: int = 8765, token: str = ''):
  """A threaded werkzeug server of create_app (`serve_forever()` runs it; port 0 takes a free one, see `.port`)."""
  from werkzeug import serving  # pylint: disable=g-import-not-at-top  (Flask's own server)
  if host not in LOCAL_HOSTS and not token:
    raise ValueError(f'--host={host} is reachable by others: pass --token=SECRET (checked on every request)')
  return serving.make_server(host, port, create_app(workdir, token), threaded=True)
