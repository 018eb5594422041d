"""MoE: every fast dispatch path against the per-expert loop, losses by hand, padding, variants, sharding specs.

Expert parallelism on 8 simulated devices is in test_moe_parallel.py (slower: one compile per mesh).
"""
import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab import sharding
from lmlab.models import Transformer
from lmlab.models import moe
from lmlab.models.config import ModelConfig, MoeConfig
from lmlab.models.mlp import Mlp

D, F = 16, 24


def config(**moe_kw) -> ModelConfig:
  moe_kw = {'num_experts': 4, 'top_k': 2, **moe_kw}
  return ModelConfig(d_model=D, ffn_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, vocab_size=64,
                     compute_dtype='float32', moe=MoeConfig(expert_ffn_dim=F, **moe_kw))


def inputs(B=2, L=8, seed=0):
  x_BLD = jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))
  segment_ids_BL = jnp.ones((B, L), jnp.int32).at[1, L - 3:].set(0)  # row 1 ends in padding
  return x_BLD, segment_ids_BL


def replace(c: ModelConfig, num_layers: int | None = None, **moe_kw) -> ModelConfig:
  return dataclasses.replace(c, num_layers=num_layers or c.num_layers, moe=dataclasses.replace(c.moe, **moe_kw))


def init_params(c, x_BLD, segment_ids_BL):
  return nn.unbox(jax.jit(moe.MoeMlp(c).init)(jax.random.PRNGKey(1), x_BLD, segment_ids_BL))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6, what=''):
  assert jax.tree.structure(actual) == jax.tree.structure(expected), f'{what}: different trees'
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f'{what}{jax.tree_util.keystr(path)}')


def output_and_grads(c, variables, x_BLD, segment_ids_BL):
  """MoE output, metrics, and gradients of a scalar that uses the output and the router losses."""
  layer = moe.MoeMlp(c)

  def loss(params, x):
    y_BLD, metrics = layer.apply({**variables, 'params': params}, x, segment_ids_BL)
    return jnp.sum(jnp.sin(y_BLD)) + metrics['loss'], (y_BLD, metrics)

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  with jax.numpy_rank_promotion('raise'):  # no silent broadcasting in the MoE layer
    (_, (y_BLD, metrics)), grads = grad_fn(variables['params'], x_BLD)
  return y_BLD, metrics, grads


ROUTERS = {'softmax': {}, 'sigmoid_bias': {'router': 'sigmoid_bias', 'top_k': 3, 'zero_experts': 1},
           'switch': {'router': 'switch'}}


@functools.cache
def reference_run(router):
  x_BLD, segment_ids_BL = inputs()
  ref = config(dispatch='reference', **ROUTERS[router])
  variables = init_params(ref, x_BLD, segment_ids_BL)
  return variables, output_and_grads(ref, variables, x_BLD, segment_ids_BL)


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
@pytest.mark.parametrize('router', ROUTERS)
def test_dispatch_equals_reference_loop(dispatch, router):
  x_BLD, segment_ids_BL = inputs()
  variables, (y_ref, metrics_ref, grads_ref) = reference_run(router)
  c = config(dispatch=dispatch, capacity_factor=8.0, **ROUTERS[router])  # C = T: nothing can be dropped
  y, metrics, grads = output_and_grads(c, variables, x_BLD, segment_ids_BL)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  assert float(metrics['dropped_fraction']) == 0.0
  assert_trees_close(metrics, metrics_ref, what='metrics')
  assert_trees_close(grads, grads_ref, what='grads')


def test_sort_backward_gathers_instead_of_scattering():
  x_AD = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  order_A = jnp.array([3, 0, 5, 1, 4, 2])
  inverse_A = jnp.argsort(order_A)
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(moe._permute(x, order_A, inverse_A))))  # pylint: disable=protected-access
  assert 'scatter' not in str(jax.make_jaxpr(grad)(x_AD))
  np.testing.assert_allclose(grad(x_AD), jax.grad(lambda x: jnp.sum(jnp.sin(x[order_A])))(x_AD), rtol=1e-6)


def test_dropless_with_empty_and_overfull_experts():
  # Every token picks expert 0 (several blocks); experts 1-3 get no tokens, padding tokens sort past the end.
  c = config(dispatch='dropless', top_k=1)
  x_BLD, segment_ids_BL = inputs()
  x_BLD = jnp.abs(x_BLD) + 0.5
  variables = init_params(c, x_BLD, segment_ids_BL)
  variables['params']['router'] = jnp.zeros((D, 4)).at[:, 0].set(1.0)
  y, metrics, grads = output_and_grads(c, variables, x_BLD, segment_ids_BL)
  y_ref, metrics_ref, grads_ref = output_and_grads(replace(c, dispatch='reference'), variables, x_BLD, segment_ids_BL)
  np.testing.assert_allclose(metrics['load'], [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  assert_trees_close(grads, grads_ref, what='grads')
  wi_up_grad = np.asarray(grads[0]['wi_up'])
  assert np.all(wi_up_grad[1:] == 0) and np.abs(wi_up_grad[0]).max() > 0


def test_dropless_is_block_matmuls_with_no_all_experts_intermediate():
  # ragged_dot lowered to dense work over all experts (E * A * F intermediates); the block path stays near A * F.
  E = 16
  c = config(dispatch='dropless', num_experts=E)
  x_BLD, segment_ids_BL = inputs(L=64)
  variables = init_params(c, x_BLD, segment_ids_BL)

  def loss(params, x):
    y_BLD, metrics = moe.MoeMlp(c).apply({**variables, 'params': params}, x, segment_ids_BL)
    return jnp.sum(jnp.sin(y_BLD)) + metrics['loss']

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables['params'], x_BLD).as_text()
  assert 'ragged_dot' not in hlo and 'dot_general' in hlo
  sizes = [math.prod(map(int, dims.split('x')[:-1])) for dims in re.findall(r'tensor<((?:\d+x)+)', hlo)]
  A = x_BLD.shape[0] * x_BLD.shape[1] * 2
  assert max(sizes) < E * A * min(D, F) // 2, max(sizes)


@pytest.mark.parametrize('impl', moe.CAPACITY_IMPLS)
def test_capacity_drops_exactly_the_overflowing_token(impl):
  # Router = identity on 2 features: tokens 0, 1, 2 pick expert 0, token 3 picks expert 1.
  # C = ceil(1.0 * k=1 * T=4 / E=2) = 2, so token 2 (expert 0's third) is dropped: zero expert output.
  c = ModelConfig(d_model=2, num_heads=1, num_kv_heads=1, ffn_dim=4, compute_dtype='float32',
                  moe=MoeConfig(num_experts=2, top_k=1, dispatch='capacity', capacity_factor=1.0, capacity_impl=impl))
  x_BLD = jnp.array([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])
  segment_ids_BL = jnp.ones((1, 4), jnp.int32)
  variables = init_params(c, x_BLD, segment_ids_BL)
  variables['params']['router'] = jnp.eye(2)
  assert moe.capacity(c.moe, 4) == 2
  y_BLD, metrics = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL)
  ref = replace(c, dispatch='reference')
  y_ref, _ = moe.MoeMlp(ref).apply(variables, x_BLD, segment_ids_BL)
  np.testing.assert_allclose(y_BLD[0, [0, 1, 3]], y_ref[0, [0, 1, 3]], rtol=1e-6)
  np.testing.assert_array_equal(y_BLD[0, 2], 0.0)
  assert np.abs(y_ref[0, 2]).max() > 0
  np.testing.assert_allclose(metrics['dropped_fraction'], 0.25)
  np.testing.assert_allclose(metrics['load'], [0.75, 0.25])  # load counts routed assignments, before drops


def test_capacity_first_choices_take_priority():
  # Choice-major order: every first choice is placed before any second choice (GShard).
  choice_GTK = jnp.array([[[0, 1], [1, 0], [0, 1]]])
  position_GTK, keep_GTK = moe.capacity_positions(choice_GTK, jnp.ones((1, 3, 2), bool), num_experts=2, C=2)
  np.testing.assert_array_equal(position_GTK[0], [[0, 1], [0, 2], [1, 2]])
  np.testing.assert_array_equal(keep_GTK[0], [[True, True], [True, False], [True, False]])


@pytest.mark.parametrize('k', [1, 2, 4])
def test_balance_loss_is_one_at_uniform_routing_and_larger_when_collapsed(k):
  E, T = 8, 16
  logits_TN = jnp.zeros((T, E))
  probs_TN = jax.nn.softmax(logits_TN)
  uniform_TK = (jnp.arange(T)[:, None] * k + jnp.arange(k)) % E  # every expert gets T*k/E assignments
  metrics = moe.router_metrics(logits_TN, probs_TN, uniform_TK, jnp.ones((T,), bool))
  np.testing.assert_allclose(metrics['aux_loss'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics['load'], np.full(E, 1 / E), rtol=1e-6)
  np.testing.assert_allclose(metrics['router_entropy'], math.log(E), rtol=1e-6)
  collapsed_TN = jnp.zeros((T, E)).at[:, :k].set(20.0)  # everyone picks experts 0..k-1
  collapsed_TK = jnp.broadcast_to(jnp.arange(k), (T, k))
  metrics = moe.router_metrics(collapsed_TN, jax.nn.softmax(collapsed_TN), collapsed_TK, jnp.ones((T,), bool))
  np.testing.assert_allclose(metrics['aux_loss'], E / k, rtol=1e-4)  # E * sum_{i<k} (1/k)(1/k)
  assert float(metrics['aux_loss']) > 1.0


def test_z_loss_golden_value():
  # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4; the padded third token must not count.
  logits_TN = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [50.0, 0.0]])
  choice_TK = jnp.zeros((3, 1), jnp.int32)
  metrics = moe.router_metrics(logits_TN, jax.nn.softmax(logits_TN), choice_TK, jnp.array([True, True, False]))
  np.testing.assert_allclose(metrics['z_loss'], (math.log(2) ** 2 + math.log(4) ** 2) / 2, rtol=1e-6)


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless', 'reference'])
def test_padding_is_never_routed_or_counted(dispatch):
  # A tight capacity: padding that took expert slots would change which real tokens are dropped.
  c = config(dispatch=dispatch, capacity_factor=1.0, shared_experts=1, zero_experts=1)
  x_BLD, segment_ids_BL = inputs(L=16)
  variables = init_params(c, x_BLD, segment_ids_BL)
  other_BLD = jnp.where(segment_ids_BL[..., None] == 0, 100.0 * jax.random.normal(jax.random.PRNGKey(9), x_BLD.shape),
                        x_BLD)
  apply = jax.jit(moe.MoeMlp(c).apply)
  y_BLD, metrics = apply(variables, x_BLD, segment_ids_BL)
  y_other, metrics_other = apply(variables, other_BLD, segment_ids_BL)
  np.testing.assert_array_equal(y_BLD, y_other)
  np.testing.assert_array_equal(y_BLD[1, -3:], 0.0)
  assert_trees_close(metrics_other, metrics, rtol=0, atol=0, what='metrics')
  np.testing.assert_allclose(jnp.sum(metrics['load']), 1.0, rtol=1e-6)


def test_sigmoid_bias_only_chooses_experts():
  m = MoeConfig(num_experts=4, top_k=2, router='sigmoid_bias')
  logits_TN = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  choice_TK, weights_TK, _ = moe.route(logits_TN, jnp.array([0.0, 0.0, 0.0, 100.0]), m)
  assert np.all(np.any(np.asarray(choice_TK) == 3, axis=-1)), 'a large bias must force expert 3 into every top-k'
  scores_TK = jnp.take_along_axis(jax.nn.sigmoid(logits_TN), choice_TK, axis=-1)
  np.testing.assert_allclose(weights_TK, scores_TK / scores_TK.sum(-1, keepdims=True), rtol=1e-6)


def test_sigmoid_bias_gets_no_gradient_and_moves_toward_underloaded_experts():
  c = replace(config(router='sigmoid_bias', bias_update_rate=0.01), num_layers=4, every=2)
  tokens_BL = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 64)
  model = Transformer(c)
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens_BL))
  params, model_state = variables.pop('params'), variables
  bias = model_state['router_state']['layers']['block_1']['moe']['bias']
  assert bias.shape == (2, 4), 'one bias row per MoE layer, stacked by the scan'

  def loss(router_state):
    logits_BLV, aux = model.apply({'params': params, 'router_state': router_state}, tokens_BL, mutable=False)
    return jnp.sum(logits_BLV ** 2) + jnp.sum(aux['loss']), aux

  grads, aux = jax.jit(jax.grad(loss, has_aux=True))(model_state['router_state'])
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads)), 'the router bias must get no gradient'
  new_bias = moe.update_router_state(model_state, aux, c.moe)['router_state']['layers']['block_1']['moe']['bias']
  load_XN = np.asarray(aux['load'])
  expected = 0.01 * np.sign(load_XN.mean(-1, keepdims=True) - load_XN)
  np.testing.assert_allclose(new_bias - bias, expected, rtol=1e-6)
  assert np.all((new_bias - bias)[load_XN < 0.25] > 0) and np.all((new_bias - bias)[load_XN > 0.25] < 0)


@pytest.mark.parametrize('router, trains', [({}, False), ({'router': 'switch'}, True), ({'renormalize': False}, True)])
def test_a_renormalised_top1_router_gets_no_gradient_from_the_loss_and_is_refused(router, trains):
  """Renormalised top-1 gives every token weight p / p = 1: the output cannot depend on the router's values. Switch
  (and renormalize=False) keeps p, so the loss reaches the router. Training refuses the first in one line."""
  c = config(top_k=1, aux_loss_weight=0.0, z_loss_weight=0.0, **router)
  x_BLD, segment_ids_BL = inputs()
  variables = init_params(c, x_BLD, segment_ids_BL)
  _, _, (grads, _) = output_and_grads(c, variables, x_BLD, segment_ids_BL)
  assert (float(jnp.abs(grads['router']).max()) > 1e-4) == trains
  if trains:
    moe.check_router_trains(c.moe)
  else:
    with pytest.raises(ValueError, match='set model.moe.router=switch') as e:
      moe.check_router_trains(c.moe)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless', 'reference'])
def test_zero_computation_experts_return_their_input(dispatch):
  # Slots 0, 1 compute; slots 2, 3 are identity experts. The router sends every token to slot 2.
  c = config(num_experts=2, zero_experts=2, top_k=1, dispatch=dispatch)
  x_BLD, segment_ids_BL = inputs()
  x_BLD = jnp.abs(x_BLD) + 0.5
  variables = init_params(c, x_BLD, segment_ids_BL)
  variables['params']['router'] = jnp.zeros((D, 4)).at[:, 2].set(1.0)
  y_BLD, metrics = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL)
  real = segment_ids_BL != 0
  np.testing.assert_allclose(y_BLD[real], x_BLD[real], rtol=1e-6)
  np.testing.assert_allclose(metrics['load'], [0.0, 0.0, 1.0, 0.0])
  assert float(metrics['dropped_fraction']) == 0.0


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless', 'reference'])
def test_one_expert_top1_is_the_dense_mlp(dispatch):
  c = config(num_experts=1, top_k=1, dispatch=dispatch, capacity_factor=1.0)
  x_BLD, segment_ids_BL = inputs()
  segment_ids_BL = jnp.ones_like(segment_ids_BL)
  variables = init_params(c, x_BLD, segment_ids_BL)
  p = variables['params']
  dense = {'gate': {'kernel': p['wi_gate'][0]}, 'up': {'kernel': p['wi_up'][0]}, 'down': {'kernel': p['wo'][0]}}
  y_BLD, _ = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL)
  np.testing.assert_allclose(y_BLD, Mlp(c, F).apply({'params': dense}, x_BLD), rtol=1e-5, atol=1e-6)


def test_shared_experts_add_one_wide_dense_swiglu():
  c = config(shared_experts=2)
  x_BLD, segment_ids_BL = inputs()
  variables = init_params(c, x_BLD, segment_ids_BL)
  assert variables['params']['shared']['up']['kernel'].shape == (D, 2 * F)
  routed_only = {'params': {k: v for k, v in variables['params'].items() if k != 'shared'}}
  y_BLD, _ = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL)
  y_routed, _ = moe.MoeMlp(replace(c, shared_experts=0)).apply(routed_only, x_BLD, segment_ids_BL)
  y_shared = Mlp(c, 2 * F).apply({'params': variables['params']['shared']}, x_BLD)
  real = segment_ids_BL != 0
  np.testing.assert_allclose(y_BLD[real], (y_routed + y_shared)[real], rtol=1e-5, atol=1e-6)


def test_moe_every_other_layer_with_its_own_ffn_width():
  c = replace(config(), num_layers=4, every=2)
  tokens_BL = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 64)
  model = Transformer(c)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens_BL)['params'])
  layers = params['layers']
  assert layers['block_0']['mlp']['up']['kernel'].shape == (2, D, 32), 'dense layers keep model.ffn_dim'
  assert 'moe' not in layers['block_0'] and 'mlp' not in layers['block_1']
  assert layers['block_1']['moe']['wi_up'].shape == (2, 4, D, F), 'experts use moe.expert_ffn_dim'
  _, aux = jax.jit(model.apply)({'params': params}, tokens_BL)
  assert set(aux) == {'loss', 'aux_loss', 'z_loss', 'load', 'dropped_fraction', 'router_entropy'}
  assert aux['load'].shape == (2, 4) and aux['loss'].shape == (2,)
  assert all(v.dtype == jnp.float32 for v in aux.values())


def test_jitter_only_with_a_dropout_rng():
  x_BLD, segment_ids_BL = inputs()
  c = config(jitter=0.5)
  variables = init_params(c, x_BLD, segment_ids_BL)
  y_plain, _ = moe.MoeMlp(config()).apply(variables, x_BLD, segment_ids_BL)
  y_eval, _ = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL)
  np.testing.assert_array_equal(y_eval, y_plain)
  _, m_train = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL, rngs={'dropout': jax.random.PRNGKey(3)})
  _, m_eval = moe.MoeMlp(c).apply(variables, x_BLD, segment_ids_BL)
  assert float(m_train['z_loss']) != float(m_eval['z_loss'])


def test_expert_parameters_shard_over_the_expert_axis():
  c = config()
  boxed = jax.eval_shape(lambda: Transformer(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))['params']
  sharding.check_rules_cover(boxed, sharding.DEFAULT_RULES)
  mesh = sharding.make_mesh({'fsdp': 2, 'expert': 4})
  specs = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)['layers']['block_0']['moe']
  P = jax.sharding.PartitionSpec
  assert specs['wi_gate'].spec == P(None, 'expert', 'fsdp', 'tensor')
  assert specs['wo'].spec == P(None, 'expert', 'tensor', 'fsdp')
  assert specs['router'].spec == P(None, 'fsdp', None)


def test_dropless_bfloat16_stays_close_to_the_float32_reference():
  """The dropless path in bf16 against the float32 expert loop: routing is float32 in both, so only the experts'
  matmuls round. Same bounds and reasoning as test_model.py's bf16 check (mean 5 u, max 40 u of the output scale,
  u = 2^-8; measured: mean 0.005, max 0.044 of the std)."""
  c = config(num_experts=8, top_k=2)
  x_BLD, segment_ids_BL = inputs(B=4, L=32, seed=3)
  variables = init_params(c, x_BLD, segment_ids_BL)
  reference, _ = moe.MoeMlp(replace(c, dispatch='reference')).apply(variables, x_BLD, segment_ids_BL)
  low_c = dataclasses.replace(replace(c, dispatch='dropless'), compute_dtype='bfloat16')
  low, _ = moe.MoeMlp(low_c).apply(variables, x_BLD, segment_ids_BL)
  error = np.abs(np.asarray(low, np.float32) - np.asarray(reference))
  scale, u = float(np.std(np.asarray(reference))), 2.0**-8
  assert error.mean() < 5 * u * scale and error.max() < 40 * u * scale, (error.mean() / scale, error.max() / scale)
