"""A local review page for the loop's latest samples: python -m experiments.review --workdir=DIR [--port=N] [--token=T].

Serves 127.0.0.1 by default; any other --host needs --token, checked on every request (lmlab/improve/review.py).
"""
import urllib.parse

from absl import flags

from experiments import cli
from lmlab.improve import review

_WORKDIR = flags.DEFINE_string('workdir', None, 'The loop\'s workdir (experiments.improve --workdir).')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Bind address; anything but the local host needs --token.')
_PORT = flags.DEFINE_integer('port', 8765, 'Port to serve on.')
_TOKEN = flags.DEFINE_string('token', '', 'Shared secret every request must carry (required off the local host).')


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise ValueError('--workdir is required: the directory experiments.improve wrote')
  httpd = review.server(_WORKDIR.value, _HOST.value, _PORT.value, _TOKEN.value)
  # Printed with the token (and the free port --port=0 got), so the page opens as printed.
  query = {'token': _TOKEN.value, 'annotator': 'reviewer'} if _TOKEN.value else {'annotator': 'reviewer'}
  print(f'review page: http://{_HOST.value}:{httpd.port}/?{urllib.parse.urlencode(query)} (set annotator= to your '
        'name)', flush=True)
  httpd.serve_forever()


if __name__ == '__main__':
  cli.run(main)
