"""Exact resume through real processes: a SIGKILLed run and a SIGTERMed one both end with the uninterrupted losses."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import tiny

ROOT, STEPS = tiny.ROOT, tiny.STEPS
TRAIN_FLAGS = tiny.train_flags(checkpoint_every=4)


def start(workdir, env) -> subprocess.Popen:
  with open(os.path.join(workdir, 'out.log'), 'a') as log:  # the child keeps its own copy of the file
    return subprocess.Popen([sys.executable, '-m', 'experiments.train', *TRAIN_FLAGS, f'--workdir={workdir}'],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(child: subprocess.Popen, timeout: float = 400) -> int:
  try:
    return child.wait(timeout)
  except subprocess.TimeoutExpired:
    child.kill()
    child.wait()
    raise


def output(workdir) -> str:
  with open(os.path.join(workdir, 'out.log')) as f:
    return f.read()


def wait_for(pattern: str, child: subprocess.Popen, timeout: float = 400) -> None:
  """Waits for a file of a child run; the deadline only catches a hung child (3 runs share 2 busy cores here)."""
  deadline = time.time() + timeout
  while not glob.glob(pattern):
    if child.poll() is not None or time.time() > deadline:
      child.kill()
      child.wait()
      pytest.fail(f'{pattern} never appeared (exit status {child.returncode})')
    time.sleep(0.005)


def losses(workdir) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(row['step'], row['loss']) for row in map(json.loads, f) if 'loss' in row]


def test_killed_and_preempted_runs_resume_with_the_uninterrupted_losses(tmp_path, tmp_path_factory):
  """Three runs side by side (the CPUs idle during compiles); then the two stopped ones restart side by side."""
  env = tiny.child_env(tmp_path_factory, devices=2)
  runs = {name: tmp_path / name for name in ('uninterrupted', 'killed', 'preempted')}
  for workdir in runs.values():
    workdir.mkdir()
  children = {name: start(workdir, env) for name, workdir in runs.items()}
  try:
    wait_for(str(runs['killed'] / 'checkpoints' / '4'), children['killed'])
    children['killed'].send_signal(signal.SIGKILL)
    wait_for(str(runs['preempted'] / 'checkpoints' / '4*'), children['preempted'])  # the save of step 4 has begun
    children['preempted'].send_signal(signal.SIGTERM)
    status = {name: finish(child) for name, child in children.items()}
    assert status['uninterrupted'] == 0, output(runs['uninterrupted'])
    assert status['killed'] == -signal.SIGKILL, 'the run finished before the kill; give it more steps'
    assert status['preempted'] == 0, output(runs['preempted'])
    children = {name: start(runs[name], env) for name in ('killed', 'preempted')}
    assert all(finish(child) == 0 for child in children.values()), [output(w) for w in runs.values()]
  finally:
    for child in children.values():
      if child.poll() is None:
        child.kill()
  reference = losses(runs['uninterrupted'])
  assert [step for step, _ in reference] == list(range(1, STEPS + 1))

  resumed = re.search(r'resumed from step (\d+) \(([^)]*)\)', output(runs['killed']))
  assert resumed and resumed.group(2) == str(runs['killed'] / 'checkpoints' / resumed.group(1)), output(runs['killed'])
  assert losses(runs['killed']) == reference  # bitwise: one clean history, the killed run's extra rows dropped

  stop = re.search(r'preempted at step (\d+): checkpoint saved to (\S+)', output(runs['preempted']))
  assert stop and stop.group(2) == str(runs['preempted'] / 'checkpoints' / stop.group(1)), output(runs['preempted'])
  assert int(stop.group(1)) < STEPS
  assert f'resumed from step {stop.group(1)} ({stop.group(2)})' in output(runs['preempted'])
  assert losses(runs['preempted']) == reference
