"""Gradient x input, integrated gradients and occlusion (one compiled call): exact on linear functions, consistent
on a tiny model, and a padded batch of inputs equal to each input alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.convert import testing
from lmlab.interpret import attribution, capture, objective

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


@pytest.fixture(scope='module')
def from_pad(llama):
  """Every method from the pad baseline with 2 IG steps: the one compile the tests below share."""
  config, variables, _, f, x_LD, _ = llama
  base_LD = attribution.baseline(config, variables['params'], TOKENS, 'pad', pad_id=0)
  return base_LD, attribution.attribute(f, x_LD, base_LD, attribution.METHODS, 2)


@pytest.mark.parametrize('rule', attribution.RULES)
def test_attribution_is_exact_for_a_linear_function(rule):
  w_LD, f = linear()
  x_LD = jax.random.normal(jax.random.key(1), (6, 4))
  base_LD = jax.random.normal(jax.random.key(2), (6, 4))
  got = attribution.attribute(f, x_LD, base_LD, attribution.METHODS, 3, rule)
  np.testing.assert_allclose(got['integrated_gradients'], jnp.sum(w_LD * (x_LD - base_LD), -1), rtol=1e-5,
                             atol=1e-5)
  assert float(got['ig_completeness_gap']) < 1e-4
  np.testing.assert_allclose(got['grad_x_input'], jnp.sum(w_LD * x_LD, -1), rtol=1e-6)
  np.testing.assert_allclose(got['occlusion'], jnp.sum(w_LD * (x_LD - base_LD), -1), rtol=1e-4, atol=1e-4)
  assert set(attribution.attribute(f, x_LD, base_LD, ['occlusion'])) == {'occlusion'}
  with pytest.raises(ValueError, match='telepathy'):
    attribution.attribute(f, x_LD, base_LD, ['occlusion', 'telepathy'])


def test_quadrature_rules_integrate_polynomials():
  for rule, degree in (('riemann', 1), ('gauss_legendre', 7)):
    alphas, weights = attribution.quadrature(4, rule)
    np.testing.assert_allclose(np.sum(weights * alphas**degree), 1 / (degree + 1), rtol=1e-12)
  with pytest.raises(ValueError, match='riemann, gauss_legendre'):
    attribution.quadrature(4, 'simpson')


def test_objective_is_the_models_score(llama):
  _, _, captured, f, x_LD, target = llama
  np.testing.assert_allclose(f(x_LD), jax.nn.log_softmax(captured['logits'][0, -1])[target], rtol=1e-5)


def test_attribution_is_zero_when_input_is_the_baseline(llama, from_pad):
  _, _, _, f, x_LD, _ = llama
  got = attribution.attribute(f, x_LD, x_LD, attribution.METHODS, 2)  # the fixture's compile: only values differ
  np.testing.assert_array_equal(got['integrated_gradients'], 0.0)
  assert float(got['ig_completeness_gap']) == 0.0
  np.testing.assert_array_equal(got['occlusion'], 0.0)
  assert np.abs(from_pad[1]['integrated_gradients']).max() > 1e-3  # not zero for any reason but x = baseline


def test_completeness_gap_shrinks_with_steps(llama, from_pad):
  _, _, _, f, x_LD, _ = llama
  base_LD, two = from_pad
  total = float(f(x_LD) - f(base_LD))
  sixteen = attribution.attribute(f, x_LD, base_LD, ['integrated_gradients'], 16)
  gaps = {}
  for steps, got in ((2, two), (16, sixteen)):
    np.testing.assert_allclose(float(got['ig_completeness_gap']),
                               abs(float(jnp.sum(got['integrated_gradients'])) - total), atol=1e-6)
    gaps[steps] = float(got['ig_completeness_gap'])
  # Measured: gaps 0.38 and 2.6e-4 for a score difference of 0.75.
  assert gaps[16] < gaps[2] / 100 and gaps[16] < 1e-2 * abs(total), gaps


def test_occlusion_is_leave_one_token_out(llama, from_pad):
  config, variables, _, f, x_LD, _ = llama
  base_LD, got = from_pad
  np.testing.assert_allclose(base_LD, jnp.broadcast_to(variables['params']['embed']['embedding'][0], x_LD.shape))
  for l in (0, 3, 7):  # a causal model: the last position sees every token
    np.testing.assert_allclose(got['occlusion'][l], f(x_LD) - f(x_LD.at[l].set(base_LD[l])), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='pad token'):
    attribution.baseline(config, variables['params'], TOKENS, 'pad')


def test_a_padded_batch_in_rounds_equals_each_input_alone(llama, from_pad, capsys):
  config, variables, _, f, x_LD, target = llama
  short = TOKENS[:5]
  score = lambda captured: jax.nn.log_softmax(captured['logits'][0, -1])[target]  # as the fixture's f
  f_short = attribution.embedding_objective(config, variables, short, score)
  x_short = attribution.token_embeddings(config, variables['params'], short)
  base_short = attribution.baseline(config, variables['params'], short, 'pad', pad_id=0)
  want_short = attribution.attribute(f_short, x_short, base_short, attribution.METHODS, 2)
  # Three inputs, two per round: the second round is the short input and a filler copy of it.
  rows = [short, TOKENS, short]
  tokens_BL = np.array([r + [0] * (8 - len(r)) for r in rows])
  real_BL = (np.arange(8) < np.array([5, 8, 5])[:, None]).astype(np.int32)
  got = attribution.attribute_inputs(
      config, variables, objective.Objective(config), {}, tokens_BL, real_BL, [4, 7, 4],
      [target] * 3, attribution.token_embeddings(config, variables['params'], tokens_BL),
      attribution.baseline(config, variables['params'], tokens_BL, 'pad', pad_id=0), attribution.METHODS, 2,
      inputs_per_round=2, progress=True)
  assert capsys.readouterr().out.splitlines() == ['attribution: inputs 1-2 of 3 done',
                                                  'attribution: inputs 3-3 of 3 done']
  for b, want in ((0, want_short), (1, from_pad[1]), (2, want_short)):
    L = len(rows[b])
    for method in attribution.METHODS:
      np.testing.assert_allclose(got[method][b, :L], want[method], rtol=1e-5, atol=1e-5, err_msg=f'{b} {method}')
    np.testing.assert_allclose(got['ig_completeness_gap'][b], want['ig_completeness_gap'], rtol=1e-4, atol=1e-6)
