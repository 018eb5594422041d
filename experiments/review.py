"""A local review page for the loop's latest samples: python -m experiments.review --workdir=DIR [--port=N].

Serves 127.0.0.1 by default; any other --host needs --token, checked on every request (lmlab/improve/review.py).
"""
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
  if _HOST.value not in review.LOCAL_HOSTS and not _TOKEN.value:
    raise ValueError(f'--host={_HOST.value} is reachable by others: pass --token=SECRET (checked on every request)')
  review.create_app(_WORKDIR.value, _TOKEN.value).run(host=_HOST.value, port=_PORT.value)


if __name__ == '__main__':
  cli.run(main)
