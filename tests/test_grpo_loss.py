"""GRPO's loss pieces against hand-computed values, TRL's formulas and the policy-gradient theorem."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.finetune import grpo, grpo_loss


def test_advantages_have_zero_mean_per_group_and_vanish_for_a_constant_group():
  rewards_NG = jnp.asarray([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [3.0, -1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]])
  advantages_NG = grpo_loss.group_advantages(rewards_NG)
  np.testing.assert_allclose(advantages_NG.mean(-1), 0.0, atol=1e-6)
  assert advantages_NG[1].tolist() == [0.0] * 4 and advantages_NG[3].tolist() == [0.0] * 4
  assert grpo_loss.zero_variance_groups(rewards_NG).tolist() == [False, True, False, True]


def test_rewards_one_and_zero_give_the_documented_values():
  """G = 2: mean 0.5, Bessel std sqrt(0.5), so +-0.5 / (sqrt(0.5) + 1e-4); unscaled (Dr. GRPO) +-0.5."""
  want = 0.5 / (math.sqrt(0.5) + 1e-4)
  np.testing.assert_allclose(grpo_loss.group_advantages(jnp.asarray([[1.0, 0.0]])), [[want, -want]], rtol=1e-6)
  np.testing.assert_allclose(want, 0.70700, atol=1e-5)
  assert grpo_loss.group_advantages(jnp.asarray([[1.0, 0.0]]), scale=False).tolist() == [[0.5, -0.5]]


def test_advantages_match_trl():
  """TRL's GRPOTrainer: (r - group mean) / (Bessel-corrected group std + 1e-4), in torch."""
  torch = pytest.importorskip('torch')
  rewards_NG = np.random.default_rng(0).normal(0, 2, (5, 8)).astype(np.float32)
  r = torch.tensor(rewards_NG, dtype=torch.float64)
  want = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
  np.testing.assert_allclose(grpo_loss.group_advantages(jnp.asarray(rewards_NG)), want.numpy(), rtol=1e-5, atol=1e-6)


def test_one_sample_per_prompt_is_an_error():
  with pytest.raises(ValueError, match='at least 2 samples'):
    grpo_loss.group_advantages(jnp.zeros((4, 1)))


def test_k3_kl_is_zero_at_initialisation_never_negative_and_unbiased():
  rng = np.random.default_rng(0)
  policy_BL = jnp.asarray(-rng.uniform(0, 30, (64, 64)), jnp.float32)
  assert float(jnp.abs(grpo_loss.k3_kl(policy_BL, policy_BL)).max()) == 0.0
  for scale in (1e-7, 1e-3, 1.0, 20.0):  # from rounding-sized to large differences, both signs
    reference_BL = policy_BL + jnp.asarray(rng.normal(0, scale, policy_BL.shape), jnp.float32)
    assert float(grpo_loss.k3_kl(policy_BL, reference_BL).min()) >= 0.0, scale
  # Under samples from the policy p, the mean of k3 is KL(p || q) (Schulman, "Approximating KL divergence").
  p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
  samples = rng.choice(3, size=200_000, p=p)
  estimate = float(grpo_loss.k3_kl(jnp.log(p[samples])[None], jnp.log(q[samples])[None]).mean())
  np.testing.assert_allclose(estimate, float(np.sum(p * np.log(p / q))), rtol=0.02)


def policy_logprobs(theta_BLV, tokens_BL):
  return jnp.take_along_axis(jax.nn.log_softmax(theta_BLV, -1), tokens_BL[..., None], -1)[..., 0]


@pytest.mark.parametrize('normalization', ['sequence', 'token'])
def test_first_step_loss_is_zero_but_its_gradient_is_the_policy_gradient(normalization):
  """One inner update: old = policy, ratio 1, so the loss is -mean(A) = 0 (sequence level, or equal lengths), while
  its gradient is the REINFORCE one, -sum A w grad log pi, which is not 0."""
  rng = np.random.default_rng(1)
  N, G, L, V = 2, 3, 5, 7
  theta_BLV = jnp.asarray(rng.normal(0, 1, (N * G, L, V)), jnp.float32)
  tokens_BL = jnp.asarray(rng.integers(0, V, (N * G, L)), jnp.int32)
  lengths = [5, 2, 4, 3, 5, 1] if normalization == 'sequence' else [4] * 6
  mask_BL = jnp.asarray(np.arange(L)[None] < np.array(lengths)[:, None], jnp.float32)
  advantages_B = grpo_loss.group_advantages(jnp.asarray([[1.0, 0.0, 0.0], [0.2, 0.9, 0.4]])).reshape(-1)
  weights_BL = grpo_loss.loss_weights(mask_BL, normalization)

  def loss(theta):
    policy_BL = policy_logprobs(theta, tokens_BL)
    loss_BL, _ = grpo_loss.token_loss(policy_BL, jax.lax.stop_gradient(policy_BL), advantages_B, beta=0.04,
                                      reference_BL=jax.lax.stop_gradient(policy_BL))
    return jnp.sum(loss_BL * weights_BL) / jnp.sum(weights_BL)

  reinforce = lambda theta: -jnp.sum(advantages_B[:, None] * weights_BL * policy_logprobs(theta, tokens_BL)) / jnp.sum(
      weights_BL)
  value, grad = jax.jit(jax.value_and_grad(loss))(theta_BLV)
  assert abs(float(value)) < 1e-6
  want = jax.jit(jax.grad(reinforce))(theta_BLV)
  assert float(jnp.abs(want).max()) > 1e-2
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


class LogitsModel:
  """A stand-in model whose logits are its parameter 'theta' [B, L, V], so grpo_loss_fn can be checked by hand."""

  def apply(self, variables, tokens_BL, positions_BL, segment_ids_BL, rngs=None):
    del tokens_BL, positions_BL, segment_ids_BL, rngs
    return variables['params']['theta'], {}

  def reference_variables(self, model_state):
    return {'params': model_state['reference']}


def test_loss_fn_takes_log_probs_at_the_sampling_temperature():
  """Rollouts sampled at temperature T come from softmax(logits / T): the gradient must be that policy's REINFORCE
  gradient and the KL compare the T-scaled policy and reference (TRL's convention), not the T = 1 ones."""
  rng = np.random.default_rng(2)
  B, L, V, T = 4, 3, 5, 0.5
  theta_BLV, reference_BLV = (jnp.asarray(rng.normal(0, 2, (B, L, V)), jnp.float32) for _ in range(2))
  tokens_BL = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  advantages_B = grpo_loss.group_advantages(jnp.asarray([[1.0, 0.0], [0.3, 0.9]])).reshape(-1)
  mask_BL = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], jnp.float32)
  batch = {'inputs': tokens_BL, 'positions': tokens_BL, 'segment_ids': tokens_BL, 'targets': tokens_BL,
           'advantages': advantages_B, 'response': mask_BL, 'weights': mask_BL}
  loss_fn = grpo.grpo_loss_fn(LogitsModel(), LogitsModel(), beta=0.0, temperature=T)
  model_state = {'reference': {'theta': reference_BLV}}
  mean_loss = lambda theta: loss_fn({'theta': theta}, model_state, batch, None)[0] / jnp.sum(mask_BL)
  reinforce = lambda theta, t: -jnp.sum(advantages_B[:, None] * mask_BL * policy_logprobs(theta / t, tokens_BL)) / (
      jnp.sum(mask_BL))
  want = jax.grad(reinforce)(theta_BLV, T)
  gap = float(jnp.abs(want - jax.grad(reinforce)(theta_BLV, 1.0)).max())
  assert gap > 0.3 * float(jnp.abs(want).max())  # the T = 1 gradient is a different one here
  np.testing.assert_allclose(jax.grad(mean_loss)(theta_BLV), want, rtol=1e-5, atol=1e-6)
  k3 = grpo_loss.k3_kl(policy_logprobs(theta_BLV / T, tokens_BL), policy_logprobs(reference_BLV / T, tokens_BL))
  _, _, aux = loss_fn({'theta': theta_BLV}, model_state, batch, None)
  np.testing.assert_allclose(aux['grpo/kl'], jnp.sum(k3 * mask_BL) / jnp.sum(mask_BL), rtol=1e-5)
  with pytest.raises(ValueError, match='temperature=0 must be > 0'):
    grpo.grpo_loss_fn(LogitsModel(), LogitsModel(), temperature=0)


def test_clipping_hand_computed():
  """ratio 1.5 with A = 1 is clipped to 1.2; ratio 0.5 with A = -1 to 0.8; ratio 0.5 with A = 1 is not clipped."""
  old_BL = jnp.zeros((3, 1))
  policy_BL = jnp.log(jnp.asarray([[1.5], [0.5], [0.5]]))
  advantages_B = jnp.asarray([1.0, -1.0, 1.0])
  loss_BL, metrics = grpo_loss.token_loss(policy_BL, old_BL, advantages_B, epsilon_low=0.2, epsilon_high=0.2)
  np.testing.assert_allclose(loss_BL[:, 0], [-1.2, 0.8, -0.5], rtol=1e-6)
  assert metrics['clipped'][:, 0].tolist() == [1.0, 1.0, 0.0] and 'kl' not in metrics
  grad_BL = jax.grad(lambda p: grpo_loss.token_loss(p, old_BL, advantages_B)[0].sum())(policy_BL)
  np.testing.assert_allclose(grad_BL[:, 0], [0.0, 0.0, -0.5], rtol=1e-6)  # clipped tokens get no gradient
  loss_BL, metrics = grpo_loss.token_loss(policy_BL, old_BL, advantages_B, epsilon_high=0.6)  # DAPO's clip-higher
  assert metrics['clipped'][:, 0].tolist() == [0.0, 1.0, 0.0] and float(loss_BL[0, 0]) == pytest.approx(-1.5)


def test_kl_term_is_beta_times_k3():
  policy_BL, reference_BL = jnp.asarray([[-1.0, -2.0]]), jnp.asarray([[-1.5, -1.0]])
  loss_0, _ = grpo_loss.token_loss(policy_BL, policy_BL, jnp.asarray([0.7]))
  loss_b, metrics = grpo_loss.token_loss(policy_BL, policy_BL, jnp.asarray([0.7]), beta=0.1, reference_BL=reference_BL)
  k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
  np.testing.assert_allclose(metrics['kl'][0], k3, rtol=1e-6)
  np.testing.assert_allclose(loss_b - loss_0, [[0.1 * k for k in k3]], rtol=1e-5)
  with pytest.raises(ValueError, match='needs the reference'):
    grpo_loss.token_loss(policy_BL, policy_BL, jnp.asarray([0.7]), beta=0.1)


def test_loss_weights_token_and_sequence():
  """Responses of 3 and 1 tokens with per-token losses [1, 2, 3] and [5]: token level (1+2+3+5)/4 = 2.75,
  sequence level (2 + 5)/2 = 3.5."""
  mask_BL = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
  loss_BL = jnp.asarray([[1.0, 2.0, 3.0], [5.0, 9.0, 9.0]])
  for normalization, want in (('token', 2.75), ('sequence', 3.5)):
    w = grpo_loss.loss_weights(mask_BL, normalization)
    assert float(jnp.sum(loss_BL * w) / jnp.sum(w)) == pytest.approx(want), normalization
  with pytest.raises(ValueError, match='not one of token, sequence'):
    grpo_loss.loss_weights(mask_BL, 'row')
