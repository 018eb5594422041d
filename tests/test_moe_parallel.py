"""Expert parallelism: a full Transformer forward + grad on 8 simulated devices equals the single-device run."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab import sharding
from lmlab.models import Transformer
from test_moe import assert_trees_close, config

EP_TOKENS_BL = jax.random.randint(jax.random.PRNGKey(0), (8, 12), 0, 64)
EP_SEGMENTS_BL = jnp.ones((8, 12), jnp.int32).at[:, 10:].set(0)


def ep_model_and_step(moe_items):
  c = config(**{'num_experts': 8, 'capacity_factor': 4.0, 'shared_experts': 1, 'zero_experts': 1, **dict(moe_items)})
  model = Transformer(c)

  def loss(p):
    logits_BLV, aux = model.apply({'params': p}, EP_TOKENS_BL, None, EP_SEGMENTS_BL)
    return jnp.mean(jax.nn.logsumexp(logits_BLV, axis=-1) * EP_SEGMENTS_BL) + jnp.sum(aux['loss']), aux

  return model, jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.cache
def single_device_run(moe_items):
  """Boxed params (init without a mesh: the local path) and the unsharded loss, aux and grads."""
  model, step = ep_model_and_step(moe_items)
  boxed = jax.jit(model.init)(jax.random.PRNGKey(1), EP_TOKENS_BL)['params']
  return boxed, step(nn.unbox(boxed))


# Capacity factor 0.5 drops picks; the gather implementation on the mesh is compared with the einsum one on one device.
@pytest.mark.parametrize('moe_kw,mesh_sizes', [
    ({'dispatch': 'dropless'}, {'data': 2, 'expert': 4}),
    ({'dispatch': 'capacity'}, {'data': 2, 'expert': 4}),
    ({'dispatch': 'dropless'}, {'fsdp': 2, 'expert': 2, 'tensor': 2}),
    ({'dispatch': 'capacity', 'capacity_impl': 'gather', 'capacity_factor': 0.5}, {'data': 2, 'expert': 4}),
])
def test_expert_parallel_transformer_equals_single_device(moe_kw, mesh_sizes):
  oracle_kw = {k: v for k, v in moe_kw.items() if k != 'capacity_impl'}
  boxed, ((loss_1, aux_1), grads_1) = single_device_run(tuple(sorted(oracle_kw.items())))
  _, step = ep_model_and_step(tuple(sorted(moe_kw.items())))
  mesh = sharding.make_mesh(mesh_sizes)
  sharded = jax.device_put(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    lowered = step.lower(sharded)
    assert 'all_to_all' in lowered.as_text(), 'expected the expert-parallel path'
    (loss_n, aux_n), grads_n = lowered.compile()(sharded)
  dropped = float(aux_1['dropped_fraction'].max())
  assert dropped > 0 if moe_kw.get('capacity_factor', 4.0) < 1 else dropped == 0.0, dropped
  np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
  assert_trees_close(aux_n, aux_1, rtol=1e-4, atol=1e-6, what='aux')
  assert_trees_close(grads_n, grads_1, rtol=1e-4, atol=1e-6, what='grads')
