"""Training throughput of a config on random tokens: one JSON line with tokens/s, step and compile time, MFU.

python -m experiments.benchmark --config=experiments/configs/dense_1b.py [--steps 20] [--peak_tflops 989]
"""
import json
import time

from absl import flags

from experiments import cli

_CONFIG = cli.define_config_flag('experiments/configs/dense_tiny.py')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after the warmup steps).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device for MFU; default by device kind (H100 989).')


def random_batch(config, mesh):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lmlab.data import pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(config.seed)
  tokens = rng.integers(0, config.model.vocab_size, (config.batch_size, config.seq_len + 1), dtype=np.int32)
  shape = (config.batch_size, config.seq_len)
  return pipeline.to_global({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                             'segment_ids': np.ones(shape, np.int32),
                             'positions': np.broadcast_to(np.arange(config.seq_len, dtype=np.int32), shape).copy(),
                             'weights': np.ones(shape, np.float32)}, mesh)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from lmlab.train import build, flops  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  parts = build.build(config)
  with parts.context():
    state = parts.create_state()
    batch = random_batch(config, parts.mesh)
    start = time.perf_counter()
    compiled = parts.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics['loss'])
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = compiled(state, batch)
    loss = float(metrics['loss'])
    step_s = (time.perf_counter() - start) / _STEPS.value
  device = jax.devices()[0]
  tokens_per_s = config.batch_size * config.seq_len / step_s
  # MoE: the share of routed picks that reached computing experts, as measured on the last step.
  share = flops.computing_share(parts.model_config, jax.device_get(metrics['moe/load'])) \
      if parts.model_config.is_moe else None
  flops_per_token = flops.flops_per_token(parts.model_config, config.seq_len, share)
  peak = _PEAK.value or flops.peak_tflops(device.device_kind)
  memory = device.memory_stats() or {}
  print(json.dumps({
      'config': cli.config_name(), 'device': device.device_kind, 'num_devices': jax.device_count(),
      'batch_size': config.batch_size, 'seq_len': config.seq_len,
      'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
      'active_matmul_params': flops.active_matmul_params(parts.model_config, share),
      'tokens_per_s': round(tokens_per_s, 1), 'step_s': round(step_s, 5), 'compile_s': round(compile_s, 2),
      'peak_memory_gib': round(memory['peak_bytes_in_use'] / 2**30, 2) if 'peak_bytes_in_use' in memory else None,
      'flops_per_token': flops_per_token,
      'mfu': round(tokens_per_s * flops_per_token / (peak * 1e12 * jax.device_count()), 4) if peak else None,
      'peak_tflops': peak, 'loss': round(loss, 4), 'attention': config.model.attention,
      'compute_dtype': config.model.compute_dtype, 'remat': config.model.remat,
      'loss_vocab_chunk': config.model.loss_vocab_chunk}), flush=True)


if __name__ == '__main__':
  cli.run(main)
