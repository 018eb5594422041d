"""Two CPU processes on localhost train exactly like one process with the same global batch and devices."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny

from lmlab import distributed

ROOT, STEPS = tiny.ROOT, tiny.STEPS
TRAIN_FLAGS = tiny.train_flags(checkpoint_every=12)


def losses(workdir) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(row['step'], row['loss']) for row in map(json.loads, f) if 'loss' in row]


def run_launcher(command: list[str], env: dict) -> tuple[int, str]:
  """The launcher sets each process's device count and stops both when one fails or when it gets SIGTERM."""
  launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  try:
    out, _ = launcher.communicate(timeout=240)
  finally:
    if launcher.poll() is None:  # a hang: SIGTERM makes the launcher stop its processes, then it goes too
      launcher.terminate()
      try:
        launcher.wait(90)
      finally:
        launcher.kill()
  return launcher.returncode, out


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tmp_path_factory):
  train = [sys.executable, '-m', 'experiments.train', *TRAIN_FLAGS]
  single = subprocess.Popen([*train, f'--workdir={tmp_path / "single"}'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=tiny.child_env(tmp_path_factory, devices=2))
  launcher = [sys.executable, os.path.join(ROOT, 'launch', 'local_multiprocess.py'), '--num_processes=2',
              '--cpu_devices=1', '--', *train, f'--workdir={tmp_path / "multi"}']
  try:
    status, multi_out = run_launcher(launcher, tiny.child_env(tmp_path_factory, devices=8))
    single_out, _ = single.communicate(timeout=120)
  finally:
    single.kill()
  assert status == 0, multi_out
  assert single.returncode == 0, single_out
  assert multi_out.count('starting from scratch') == 1  # the console belongs to process 0
  assert sorted(os.listdir(tmp_path / 'multi' / 'checkpoints')) == ['12', '24']
  status, again = run_launcher(launcher, tiny.child_env(tmp_path_factory, devices=8))  # both processes restore step 24
  assert status == 0 and again.count(f'resumed from step 24 ({tmp_path}/multi/checkpoints/24)') == 1, again
  ours, theirs = losses(tmp_path / 'multi'), losses(tmp_path / 'single')
  assert [step for step, _ in ours] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([loss for _, loss in ours], [loss for _, loss in theirs], rtol=1e-5)
  summaries = [json.load(open(tmp_path / run / 'summary.json')) for run in ('multi', 'single')]
  assert summaries[0]['unigram_entropy'] == pytest.approx(summaries[1]['unigram_entropy'])  # counted on both hosts


def test_launcher_stops_the_other_processes_when_one_fails():
  sys.path.insert(0, os.path.join(ROOT, 'launch'))
  import local_multiprocess  # pylint: disable=g-import-not-at-top
  # Process 1 fails at once; process 0 would sleep for a minute but is sent SIGTERM.
  job = [sys.executable, '-c', 'import sys, time; sys.exit(3) if "--process_id=1" in sys.argv else time.sleep(60)']
  start = time.time()
  assert local_multiprocess.launch(job, num_processes=2, grace_s=20) == 3
  assert time.time() - start < 15


@pytest.mark.parametrize('flags', [('', 2, 0), ('localhost:1234', 2, 2), ('localhost:1234', 1, -1)])
def test_multi_process_flags_go_together(flags):
  with pytest.raises(ValueError, match='give all three'):
    distributed.initialize(*flags)


def test_one_process_without_flags_or_scheduler_stays_single(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
