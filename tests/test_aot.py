"""Will it fit: the AOT report's parameter and optimizer bytes equal counts from the config and the sharding rules,
activation memory follows the batch, and the command line compiles for N simulated devices and gives a verdict."""
import json
import subprocess
import sys

import pytest
import tiny

from lmlab.sweep import fit

MESH = {'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2}  # 8 devices (conftest)


def counted_params(c) -> tuple[int, int]:
  """(matrix parameters, norm scales) of the tiny decoder, from its config: tied embedding, GQA attention, SwiGLU."""
  m = c.model
  head_dim = m.d_model // m.num_heads
  attention = m.d_model * head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)  # query, out; key, value
  matrices = m.vocab_size * m.d_model + m.num_layers * (attention + 3 * m.d_model * m.ffn_dim)
  norms = m.d_model * (2 * m.num_layers + 1)  # attention and mlp norm per block, final norm
  return matrices, norms


@pytest.fixture(scope='module')
def reports():
  return {batch: fit.report(tiny.dense_config(batch_size=batch, **MESH), device_memory_gib=1e-5)
          for batch in (8, 32)}


def test_parameter_and_optimizer_bytes_equal_the_counts_from_the_config(reports):
  report = reports[8]
  matrices, norms = counted_params(tiny.dense_config())
  assert report['params'] == matrices + norms
  # The rules put every matrix's embed axis on fsdp (4) and its vocab/heads/mlp axis on tensor (2); norm scales
  # have only the embed axis. float32: 4 bytes.
  assert report['param_bytes'] == 4 * (matrices // 8 + norms // 4)
  # AdamW keeps mu and nu shaped and sharded like the parameters, plus two int32 step counts (Adam's, the schedule's).
  assert report['optimizer_bytes'] == 2 * report['param_bytes'] + 2 * 4


def test_activation_memory_grows_with_the_batch_and_the_verdict_follows_the_peak(reports):
  small, large = reports[8], reports[32]
  assert large['param_bytes'] == small['param_bytes'] and large['temp_bytes'] > small['temp_bytes']
  assert small['peak_bytes'] >= small['param_bytes'] + small['optimizer_bytes'] + small['temp_bytes']
  assert small['flops_per_step'] > 0 and large['flops_per_step'] > small['flops_per_step']
  assert small['fits'] is False and small['device_memory_bytes'] == int(1e-5 * 2**30)


def test_cli_compiles_for_simulated_devices(tmp_path_factory):
  env = tiny.child_env(tmp_path_factory, devices=1)  # the entry point itself must bring the device count to 4
  flags = ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.ffn_dim=64',
           '--config.seq_len=32', '--config.batch_size=8']
  done = subprocess.run([sys.executable, '-m', 'experiments.aot', '--devices=4', '--config.mesh.fsdp=4', *flags,
                         '--device_memory_gib=1', '--json'], cwd=tiny.ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(done.stdout.strip().splitlines()[-1])
  matrices, norms = counted_params(tiny.dense_config())
  assert report['devices'] == 4 and report['mesh']['fsdp'] == 4
  assert report['param_bytes'] == 4 * (matrices + norms) // 4 and report['fits'] is True
  bad = subprocess.run([sys.executable, '-m', 'experiments.aot', '--devices=3', '--config.mesh.fsdp=2', *flags],
                       cwd=tiny.ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith('error: mesh mesh.data=-1, mesh.fsdp=2')
