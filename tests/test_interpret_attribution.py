"""Gradient x input, integrated gradients and occlusion: exact on linear functions, consistent on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.convert import testing
from lmlab.interpret import attribution, capture

TOKENS = [5, 17, 3, 40, 8, 21, 9, 2]


@pytest.fixture(scope='module')
def llama():
  config = capture.analysis_config(testing.TINY['llama'])
  variables = {'params': jax.tree.map(jnp.asarray, testing.random_params(config))}
  captured = capture.capture(config, variables, np.asarray([TOKENS]))
  target = 11
  f = attribution.embedding_objective(config, variables, TOKENS, lambda captured: jax.nn.log_softmax(
      captured['logits'][0, -1])[target])
  x_LD = attribution.token_embeddings(config, variables['params'], TOKENS)
  return config, variables, captured, f, x_LD, target


def linear():
  w_LD = jax.random.normal(jax.random.key(0), (6, 4))
  return w_LD, lambda x_LD: jnp.sum(w_LD * x_LD) + 3.0


@pytest.mark.parametrize('rule', attribution.RULES)
def test_integrated_gradients_is_exact_for_a_linear_function(rule):
  w_LD, f = linear()
  x_LD = jax.random.normal(jax.random.key(1), (6, 4))
  base_LD = jax.random.normal(jax.random.key(2), (6, 4))
  attributions_L, gap = attribution.integrated_gradients(f, x_LD, base_LD, 3, rule)
  np.testing.assert_allclose(attributions_L, jnp.sum(w_LD * (x_LD - base_LD), -1), rtol=1e-5, atol=1e-5)
  assert float(gap) < 1e-4
  np.testing.assert_allclose(attribution.gradient_x_input(f, x_LD), jnp.sum(w_LD * x_LD, -1), rtol=1e-6)
  np.testing.assert_allclose(attribution.occlusion(f, x_LD, base_LD), jnp.sum(w_LD * (x_LD - base_LD), -1),
                             rtol=1e-4, atol=1e-4)


def test_quadrature_rules_integrate_polynomials():
  for rule, degree in (('riemann', 1), ('gauss_legendre', 7)):
    alphas, weights = attribution.quadrature(4, rule)
    np.testing.assert_allclose(np.sum(weights * alphas**degree), 1 / (degree + 1), rtol=1e-12)
  with pytest.raises(ValueError, match='riemann, gauss_legendre'):
    attribution.quadrature(4, 'simpson')


def test_objective_is_the_models_score(llama):
  _, _, captured, f, x_LD, target = llama
  np.testing.assert_allclose(f(x_LD), jax.nn.log_softmax(captured['logits'][0, -1])[target], rtol=1e-5)


def test_attribution_is_zero_when_input_is_the_baseline(llama):
  _, _, _, f, x_LD, _ = llama
  attributions_L, gap = attribution.integrated_gradients(f, x_LD, x_LD, 2, 'gauss_legendre')
  np.testing.assert_array_equal(attributions_L, 0.0)
  assert float(gap) == 0.0
  np.testing.assert_array_equal(attribution.occlusion(f, x_LD, x_LD), 0.0)


def test_completeness_gap_shrinks_with_steps(llama):
  config, variables, _, f, x_LD, _ = llama
  base_LD = attribution.baseline(config, variables['params'], TOKENS, 'pad', pad_id=0)
  total = float(f(x_LD) - f(base_LD))
  gaps = {}
  for steps in (2, 16):  # 2 steps: the compile of the zero-attribution test above is reused
    attributions_L, gap = attribution.integrated_gradients(f, x_LD, base_LD, steps, 'gauss_legendre')
    np.testing.assert_allclose(float(gap), abs(float(jnp.sum(attributions_L)) - total), atol=1e-6)
    gaps[steps] = float(gap)
  # Measured: gaps 0.38 and 2.6e-4 for a score difference of 0.75.
  assert gaps[16] < gaps[2] / 100 and gaps[16] < 1e-2 * abs(total), gaps


def test_occlusion_is_leave_one_token_out(llama):
  config, variables, _, f, x_LD, _ = llama
  base_LD = attribution.baseline(config, variables['params'], TOKENS, 'pad', pad_id=0)
  np.testing.assert_allclose(base_LD, jnp.broadcast_to(variables['params']['embed']['embedding'][0], x_LD.shape))
  scores_L = attribution.occlusion(f, x_LD, base_LD)
  for l in (0, 3, 7):  # a causal model: the last position sees every token
    np.testing.assert_allclose(scores_L[l], f(x_LD) - f(x_LD.at[l].set(base_LD[l])), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='pad token'):
    attribution.baseline(config, variables['params'], TOKENS, 'pad')
