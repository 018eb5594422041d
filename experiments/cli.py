"""Shared absl plumbing for the experiment scripts: config flag, one-line errors with exit status 2."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = []


def define_config_flag(default: str | None = None):
  """`--config=FILE` plus `--config.key=value` overrides; `default` is used when --config is absent."""
  _DEFAULT_CONFIG[:] = [default] if default else []
  return config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/configs/*.py).',
                                         lock_config=True)


def define_distributed_flags():
  """--coordinator, --num_processes, --process_id for multi-process runs (see launch/); returns the joining call.

  Without them, Slurm, Open MPI or JAX_COORDINATOR_ADDRESS in the environment still start several processes.
  """
  coordinator = flags.DEFINE_string('coordinator', '', 'Multi-process: HOST:PORT of process 0 (see launch/).')
  num_processes = flags.DEFINE_integer('num_processes', 1, 'Multi-process: how many processes run this job.')
  process_id = flags.DEFINE_integer('process_id', -1, 'Multi-process: this process, 0 .. num_processes - 1.')

  def initialize() -> bool:
    from lmlab import distributed  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
    return distributed.initialize(coordinator.value, num_processes.value, process_id.value)
  return initialize


def config_name() -> str:
  """The config file this run was launched with (for reports)."""
  value = flags.FLAGS['config'].config_filename if 'config' in flags.FLAGS else ''
  return value or (_DEFAULT_CONFIG[0] if _DEFAULT_CONFIG else '')


def _parse_flags(argv):
  """absl parsing, but a bad flag (unknown key, wrong type) is one line on stderr and exit status 2."""
  if _DEFAULT_CONFIG and not any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    argv = [argv[0], f'--config={_DEFAULT_CONFIG[0]}', *argv[1:]]
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
    message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    if isinstance(error, (KeyError, AttributeError)):
      message = f'unknown config key {message.strip(chr(34))}'
    print(f'error: {message} (see --helpfull for the flags and experiments/configs/base.py for config keys)',
          file=sys.stderr)
    sys.exit(2)


def run(main):
  """app.run with lmlab's flag parser; a ValueError from config checks is a one-line exit 2 as well."""
  def guarded(argv):
    if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
      logging.set_verbosity(logging.WARNING)  # Orbax and JAX are chatty at INFO; -v 0 brings it back
    try:
      return main(argv)
    except ValueError as error:
      print(f'error: {error}', file=sys.stderr)
      sys.exit(2)
  app.run(guarded, flags_parser=_parse_flags)
