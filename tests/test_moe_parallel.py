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


def ep_model_and_step(dispatch):
  c = config(num_experts=8, dispatch=dispatch, capacity_factor=4.0, shared_experts=1, zero_experts=1)
  model = Transformer(c)

  def loss(p):
    logits_BLV, aux = model.apply({'params': p}, EP_TOKENS_BL, None, EP_SEGMENTS_BL)
    return jnp.mean(jax.nn.logsumexp(logits_BLV, axis=-1) * EP_SEGMENTS_BL) + jnp.sum(aux['loss']), aux

  return model, jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.cache
def single_device_run(dispatch):
  """Boxed params (init without a mesh: the local path) and the unsharded loss, aux and grads."""
  model, step = ep_model_and_step(dispatch)
  boxed = jax.jit(model.init)(jax.random.PRNGKey(1), EP_TOKENS_BL)['params']
  return boxed, step(nn.unbox(boxed))


@pytest.mark.parametrize('dispatch,mesh_sizes', [
    ('dropless', {'data': 2, 'expert': 4}),
    ('capacity', {'data': 2, 'expert': 4}),
    ('dropless', {'fsdp': 2, 'expert': 2, 'tensor': 2}),
])
def test_expert_parallel_transformer_equals_single_device(dispatch, mesh_sizes):
  boxed, ((loss_1, aux_1), grads_1) = single_device_run(dispatch)
  _, step = ep_model_and_step(dispatch)
  mesh = sharding.make_mesh(mesh_sizes)
  sharded = jax.device_put(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    lowered = step.lower(sharded)
    assert 'all_to_all' in lowered.as_text(), 'expected the expert-parallel path'
    (loss_n, aux_n), grads_n = lowered.compile()(sharded)
  assert float(aux_1['dropped_fraction'].max()) == 0.0
  np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
  assert_trees_close(aux_n, aux_1, rtol=1e-4, atol=1e-6, what='aux')
  assert_trees_close(grads_n, grads_1, rtol=1e-4, atol=1e-6, what='grads')
