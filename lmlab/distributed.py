"""Multi-process start-up (jax.distributed) and preemption signals that every process acts on at the same step."""
import os
import signal
import threading

import jax


def _env_int(name: str) -> int | None:
  return int(os.environ[name]) if os.environ.get(name) else None


def _cluster_env() -> bool:
  """A scheduler that jax.distributed.initialize() reads by itself (Slurm, Open MPI) started several processes."""
  return (_env_int('SLURM_NTASKS') or 1) > 1 or (_env_int('OMPI_COMM_WORLD_SIZE') or 1) > 1


def initialize(coordinator: str = '', num_processes: int = 1, process_id: int = -1) -> bool:
  """Joins a multi-process run; True when it did. Single process unless asked for by flags or the environment.

  Flags win; otherwise JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) or a Slurm / Open MPI
  job with several tasks. Must run before anything touches a JAX device.
  """
  if coordinator or num_processes > 1 or process_id >= 0:
    if not coordinator or not 0 <= process_id < num_processes:
      raise ValueError(f'--coordinator={coordinator!r} --num_processes={num_processes} --process_id={process_id}: '
                       'give all three, with HOST:PORT and 0 <= process_id < num_processes')
    kwargs = {'coordinator_address': coordinator, 'num_processes': num_processes, 'process_id': process_id}
  elif os.environ.get('JAX_COORDINATOR_ADDRESS'):
    kwargs = {'num_processes': _env_int('JAX_NUM_PROCESSES'), 'process_id': _env_int('JAX_PROCESS_ID')}
  elif _cluster_env():
    kwargs = {}
  else:
    return False
  # CPU processes exchange collectives through gloo; GPU and TPU backends ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return True


class PreemptionWatch:
  """While entered, SIGTERM and SIGINT ask training to stop; `stop_at(step)` agrees on the step across processes.

  One process: our own handlers set a flag. Several: JAX's preemption notifier owns SIGTERM and its sync point
  makes every process stop after the same step; SIGINT is turned into a SIGTERM to reach it. After the first
  signal the previous handlers come back, so a second Ctrl-C interrupts at once.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
      signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
      self._previous = {s: signal.signal(s, self._handle) for s in signals}
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._restore_handlers()
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)

  def _restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore_handlers()

  def stop_at(self, step: int) -> bool:
    """True when training should stop after `step`; call it after every step, on every process."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None
