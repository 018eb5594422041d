"""Two CPU processes on localhost train exactly like one process with the same global batch and devices."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
TRAIN_FLAGS = ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.ffn_dim=64',
               '--config.seq_len=32', '--config.batch_size=8', f'--config.steps={STEPS}', '--config.log_every=1',
               '--config.checkpoint_every=12', '--config.eval_every=12', '--config.eval_batches=1',
               '--config.progress=False']


def child_env(tmp_path_factory, devices: int) -> dict:
  cache = tmp_path_factory.getbasetemp() / 'jax_cache'
  return {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


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
                            stderr=subprocess.STDOUT, text=True, env=child_env(tmp_path_factory, devices=2))
  launcher = [sys.executable, os.path.join(ROOT, 'launch', 'local_multiprocess.py'), '--num_processes=2',
              '--cpu_devices=1', '--', *train, f'--workdir={tmp_path / "multi"}']
  try:
    status, multi_out = run_launcher(launcher, child_env(tmp_path_factory, devices=8))
    single_out, _ = single.communicate(timeout=120)
  finally:
    single.kill()
  assert status == 0, multi_out
  assert single.returncode == 0, single_out
  assert multi_out.count('starting from scratch') == 1  # the console belongs to process 0
  assert sorted(os.listdir(tmp_path / 'multi' / 'checkpoints')) == ['12', '24']
  status, again = run_launcher(launcher, child_env(tmp_path_factory, devices=8))  # both processes restore step 24
  assert status == 0 and again.count(f'resumed from step 24 ({tmp_path}/multi/checkpoints/24)') == 1, again
  ours, theirs = losses(tmp_path / 'multi'), losses(tmp_path / 'single')
  assert [step for step, _ in ours] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([loss for _, loss in ours], [loss for _, loss in theirs], rtol=1e-5)
