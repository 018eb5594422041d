"""Runs N copies of a JAX job on this machine as one multi-process run (one coordinator on a free port).

  python launch/local_multiprocess.py --num_processes=2 --cpu_devices=2 -- \\
      python -m experiments.train --config=experiments/configs/dense_tiny.py --workdir=runs/mp

Each copy gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=I`. SIGTERM and SIGINT are passed
on once to every copy (each in its own session, so a terminal Ctrl-C does not reach them twice); when one copy
fails the others get SIGTERM. Copies still running a minute after a signal or failure are killed. The exit
status is the first non-zero one, else 0.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(cpu_devices: int) -> dict:
  """This environment, with the simulated CPU device count replaced when `cpu_devices` is set."""
  env = dict(os.environ)
  if cpu_devices:
    flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
    env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={cpu_devices}'.strip()
  return env


def launch(command: list[str], num_processes: int, cpu_devices: int = 0, port: int = 0,
           grace_s: float = 60.0) -> int:
  """Starts the copies, waits for all of them, and returns the run's exit status."""
  coordinator = f'127.0.0.1:{port or free_port()}'
  env = child_env(cpu_devices)
  group = _Group([subprocess.Popen([*command, f'--coordinator={coordinator}', f'--num_processes={num_processes}',
                                    f'--process_id={i}'], env=env, start_new_session=True)
                  for i in range(num_processes)], grace_s)
  previous = {s: signal.signal(s, group.forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return group.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    group.kill()


class _Group:
  """The copies of one run: a signal or a failure gives them `grace_s` to exit cleanly, then SIGKILL."""

  def __init__(self, children: list[subprocess.Popen], grace_s: float):
    self.children, self.grace_s = children, grace_s
    self.status, self.deadline = 0, None

  def forward(self, signum, frame=None):
    del frame
    self._send(signum)

  def _send(self, signum):
    self.deadline = self.deadline or time.time() + self.grace_s
    for child in self.children:
      if child.poll() is None:
        child.send_signal(signum)

  def kill(self):
    for child in self.children:
      if child.poll() is None:
        child.kill()
        child.wait()

  def wait(self) -> int:
    """The first non-zero exit status of a copy, else 0."""
    while [child for child in self.children if child.poll() is None]:  # a list: every child gets polled
      failed = [child.returncode for child in self.children if child.returncode not in (None, 0)]
      if failed and not self.status:
        self.status = failed[0]
        print(f'launch: a process exited with status {self.status}; stopping the others', file=sys.stderr,
              flush=True)
        self._send(signal.SIGTERM)
      if self.deadline is not None and time.time() > self.deadline:
        self.kill()
      time.sleep(0.1)
    return self.status or next((child.returncode for child in self.children if child.returncode), 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_processes', type=int, default=2, help='copies to start')
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='simulated CPU devices per copy (XLA_FLAGS); 0 leaves XLA_FLAGS as it is')
  parser.add_argument('--port', type=int, default=0, help='coordinator port; 0 picks a free one')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the job command line')
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command or args.num_processes < 1:
    parser.error('give --num_processes >= 1 and the job command after --')
  sys.exit(launch(command, args.num_processes, args.cpu_devices, args.port))


if __name__ == '__main__':
  main()
