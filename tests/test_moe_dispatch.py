"""Capacity dispatch by row moves (`capacity_impl=gather`) against the GShard einsum oracle: same outputs, drops and
gradients, without the [G, T, E, C] one-hot tensors or their matmuls. Expert parallelism: test_moe_parallel.py."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.models import moe
from test_moe import ROUTERS, assert_trees_close, config, init_params, inputs, output_and_grads, replace

# pylint: disable-next=protected-access
IMPLS = {'einsum': moe._einsum_capacity_experts, 'gather': moe._gather_capacity_experts}


def assignments(G, T, K, E, C, seed):
  """Distinct random picks per token, some padding, arbitrary (not normalised) weights; capacity C overflows."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  choice_GTK = jnp.argsort(jax.random.uniform(keys[0], (G, T, E)), axis=-1)[..., :K].astype(jnp.int32)
  valid_GTK = jnp.broadcast_to((jnp.arange(T) < T - 3)[None, :, None], (G, T, K))  # each group ends in padding
  weights_GTK = jax.random.uniform(keys[1], (G, T, K), minval=0.1, maxval=1.0)
  position_GTK, keep_GTK = moe.capacity_positions(choice_GTK, valid_GTK, E, C)
  return choice_GTK, valid_GTK, keep_GTK, weights_GTK, position_GTK


@pytest.mark.parametrize('K', [1, 2])
def test_gather_equals_einsum_with_drops_output_and_gradients(K):
  """Gradients w.r.t. the tokens, the router weights and the expert weights, with about a third of picks dropped."""
  G, T, D, F, E = 3, 16, 8, 12, 4
  C = math.ceil(0.5 * K * T / E)
  choice_GTK, valid_GTK, keep_GTK, weights_GTK, position_GTK = assignments(G, T, K, E, C, seed=K)
  dropped = int(jnp.sum(valid_GTK & ~keep_GTK))
  assert 0 < dropped < int(jnp.sum(valid_GTK)), 'the capacity must drop some picks and keep others'
  keys = jax.random.split(jax.random.PRNGKey(7), 4)
  x_GTD = jax.random.normal(keys[0], (G, T, D))
  experts = (jax.random.normal(keys[1], (E, D, F)) / D**0.5, jax.random.normal(keys[2], (E, D, F)) / D**0.5,
             jax.random.normal(keys[3], (E, F, D)) / F**0.5)

  def run(impl):
    def loss(x, w, ex):
      return jnp.sum(jnp.sin(IMPLS[impl](x, choice_GTK, keep_GTK, w, position_GTK, ex, C=C)))
    with jax.numpy_rank_promotion('raise'):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x_GTD, weights_GTK, experts)

  (loss_e, grads_e), (loss_g, grads_g) = run('einsum'), run('gather')
  np.testing.assert_allclose(loss_g, loss_e, rtol=1e-5)
  assert_trees_close(grads_g, grads_e, what='grads')
  dropped_GTK = valid_GTK & ~keep_GTK
  assert np.all(np.asarray(grads_g[1])[np.asarray(dropped_GTK)] == 0), 'a dropped pick must get no weight gradient'
  assert np.abs(np.asarray(grads_g[1])[np.asarray(keep_GTK)]).min() > 0


@pytest.mark.parametrize('router', ['softmax', 'sigmoid_bias'])
def test_gather_layer_equals_einsum_layer_with_drops_and_padding(router):
  """The whole MoE layer (softmax top-2; sigmoid-bias top-3 with a zero expert): outputs, metrics, gradients of every
  parameter (the router's through the combine weights) and of the input."""
  x_BLD, segment_ids_BL = inputs(L=16)
  c = config(dispatch='capacity', capacity_factor=0.5, **ROUTERS[router])
  variables = init_params(c, x_BLD, segment_ids_BL)
  y_e, metrics_e, grads_e = output_and_grads(c, variables, x_BLD, segment_ids_BL)
  y_g, metrics_g, grads_g = output_and_grads(replace(c, capacity_impl='gather'), variables, x_BLD, segment_ids_BL)
  assert float(metrics_e['dropped_fraction']) > 0.1
  np.testing.assert_allclose(y_g, y_e, rtol=1e-5, atol=1e-6)
  assert_trees_close(metrics_g, metrics_e, what='metrics')
  assert_trees_close(grads_g, grads_e, what='grads')


def test_gather_has_no_token_by_slot_tensors_or_matmuls():
  """The einsum path's five [G, T, E, C] x D matmuls (dispatch and combine forward, three in the backward) are what
  the gather path saves; what it keeps is about the experts' 18 * G*E*C*D*F FLOPs of forward + backward."""
  c = config(dispatch='capacity')  # capacity factor 1.25, top-2
  x_BLD, segment_ids_BL = inputs(L=64)
  (G, T, D), E, F = x_BLD.shape, c.moe.num_experts, c.moe.expert_ffn_dim
  C = moe.capacity(c.moe, T)
  variables = init_params(c, x_BLD, segment_ids_BL)

  def hlo_sizes_and_flops(impl):
    layer = moe.MoeMlp(replace(c, capacity_impl=impl))

    def loss(params, x):
      y_BLD, metrics = layer.apply({**variables, 'params': params}, x, segment_ids_BL)
      return jnp.sum(jnp.sin(y_BLD)) + metrics['loss']

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables['params'], x_BLD)
    sizes = [math.prod(map(int, dims.split('x')[:-1])) for dims in re.findall(r'tensor<((?:\d+x)+)', lowered.as_text())]
    return max(sizes), lowered.compile().cost_analysis()['flops']

  (largest_e, flops_e), (largest_g, flops_g) = hlo_sizes_and_flops('einsum'), hlo_sizes_and_flops('gather')
  assert largest_e >= G * T * E * C > 2 * largest_g, (largest_e, largest_g)
  assert flops_e - flops_g >= 5 * 2 * G * T * E * C * D, (flops_e, flops_g)
  assert flops_g < 1.2 * 18 * G * E * C * D * F, flops_g


def test_unknown_capacity_impl_is_one_clear_error():
  x_BLD, segment_ids_BL = inputs()
  with pytest.raises(ValueError, match=r"model.moe.capacity_impl='sorted' is not one of einsum, gather"):
    init_params(config(dispatch='capacity', capacity_impl='sorted'), x_BLD, segment_ids_BL)
