"""Shared absl plumbing for the experiment scripts: config flag, one-line errors with exit status 2."""
import sys

from absl import app, flags
from ml_collections import config_flags


def define_config_flag(default: str | None = None):
  return config_flags.DEFINE_config_file('config', default, 'Experiment config file (experiments/configs/*.py).',
                                         lock_config=True)


def _parse_flags(argv):
  """absl parsing, but a bad flag (unknown key, wrong type) is one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
    message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    print(f'error: {message} (see --helpfull for the flags and experiments/configs/base.py for config keys)',
          file=sys.stderr)
    sys.exit(2)


def run(main):
  """app.run with lmlab's flag parser; a ValueError from config checks is a one-line exit 2 as well."""
  def guarded(argv):
    try:
      return main(argv)
    except ValueError as error:
      print(f'error: {error}', file=sys.stderr)
      sys.exit(2)
  app.run(guarded, flags_parser=_parse_flags)
