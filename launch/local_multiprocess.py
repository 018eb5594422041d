"""Runs N copies of a JAX job on this machine as one multi-process run (one coordinator on a free port).

  python launch/local_multiprocess.py --num_processes=2 --cpu_devices=2 -- \\
      python -m experiments.train --config=experiments/configs/dense_tiny.py --workdir=runs/mp

Each copy gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=I`. SIGTERM and SIGINT are passed
on once to every copy (each in its own session, so a terminal Ctrl-C does not reach them twice); when one copy
fails the others are stopped. The exit status is the first non-zero one, else 0.
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
           grace_s: float = 30.0) -> int:
  """Starts the copies, waits for all of them, and returns the run's exit status."""
  coordinator = f'127.0.0.1:{port or free_port()}'
  env = child_env(cpu_devices)
  children = [subprocess.Popen([*command, f'--coordinator={coordinator}', f'--num_processes={num_processes}',
                                f'--process_id={i}'], env=env, start_new_session=True)
              for i in range(num_processes)]

  def forward(signum, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return _wait(children, grace_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for child in children:
      if child.poll() is None:
        child.kill()


def _wait(children, grace_s: float) -> int:
  """Waits for every child; after the first failure the rest get SIGTERM, then SIGKILL after `grace_s`."""
  status, deadline = 0, None
  while any(child.poll() is None for child in children):
    failed = [child.returncode for child in children if child.returncode not in (None, 0)]
    if failed and deadline is None:
      status, deadline = failed[0], time.time() + grace_s
      print(f'launch: a process exited with status {status}; stopping the others', file=sys.stderr, flush=True)
      for child in children:
        if child.poll() is None:
          child.terminate()
    if deadline is not None and time.time() > deadline:
      for child in children:
        child.kill()
    time.sleep(0.1)
  return status or next((child.returncode for child in children if child.returncode), 0)


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
