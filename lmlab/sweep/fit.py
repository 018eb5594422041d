"""Will it fit: the train step lowered and compiled ahead of time for the config's mesh, on abstract inputs, with
per-device parameter, optimizer and activation memory and FLOPs per step; nothing is allocated or run."""
import math

import jax
import numpy as np

from lmlab import sharding
from lmlab.train import build, flops

BATCH_DTYPES = {'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32, 'positions': np.int32,
                'weights': np.float32}  # what lmlab/data/pipeline.py yields


def abstract_batch(config, mesh) -> dict:
  """One global batch as ShapeDtypeStructs, sharded like pipeline.to_global's arrays."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {name: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), dtype, sharding=batch_sharding)
          for name, dtype in BATCH_DTYPES.items()}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, as every device holds one)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def report(config, device_memory_gib: float = 0.0) -> dict:
  """Per-device memory (bytes) and FLOPs of one train step for `config` on the current devices.

  `peak_bytes` is arguments (state and batch) + outputs - donated aliases + temporaries (activations, gradients,
  optimizer scratch) from XLA's buffer assignment: an upper bound, as not every temporary lives at once. `fits`
  compares it with `device_memory_gib` when one is given.
  """
  parts = build.build(config)
  state = parts.abstract_state()
  with parts.context():
    compiled = parts.train_step.lower(state, abstract_batch(config, parts.mesh)).compile()
  memory = compiled.memory_analysis()
  # XLA:CPU's own peak figure leaves out temporaries, so the bound is assembled from the buffer assignment.
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)
  tokens = config.batch_size * config.seq_len
  result = {
      'devices': jax.device_count(), 'mesh': dict(parts.mesh.shape),
      'params': int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
      'param_bytes': per_device_bytes(state.params), 'optimizer_bytes': per_device_bytes(state.opt_state),
      'model_state_bytes': per_device_bytes(state.model_state),
      'argument_bytes': memory.argument_size_in_bytes, 'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes, 'temp_bytes': memory.temp_size_in_bytes, 'peak_bytes': int(peak),
      'flops_per_step': float(_cost(compiled).get('flops', math.nan)),  # one device's program; a scan body once
      'model_flops_per_step_per_device': flops.flops_per_token(parts.model_config, config.seq_len) * tokens
                                         / jax.device_count(),
  }
  if device_memory_gib:
    result['device_memory_bytes'] = int(device_memory_gib * 2**30)
    result['fits'] = result['peak_bytes'] <= result['device_memory_bytes']
  return result


def describe(result: dict) -> str:
  """A few lines for people: sizes in GiB/MiB, FLOPs, the verdict."""
  def size(n):
    return f'{n / 2**30:.3f} GiB' if n >= 2**30 else f'{n / 2**20:.2f} MiB'
  lines = [f'{result["devices"]} devices, mesh {result["mesh"]}, {result["params"]:,} parameters',
           f'per device: parameters {size(result["param_bytes"])}, optimizer {size(result["optimizer_bytes"])}, '
           f'activations and temporaries {size(result["temp_bytes"])}, peak {size(result["peak_bytes"])}',
           f'FLOPs per step per device: {result["flops_per_step"]:.3e} (XLA; a scanned layer stack counts once), '
           f'{result["model_flops_per_step_per_device"]:.3e} (6ND model estimate)']
  if 'fits' in result:
    lines.append(f'{"fits" if result["fits"] else "does NOT fit"} in {size(result["device_memory_bytes"])} per device')
  return '\n'.join(lines)
