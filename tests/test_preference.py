"""Preference losses: DPO (sigmoid, IPO, hinge) and Bradley-Terry against closed forms and TRL's formulas;
sequence log-probs of response tokens against log_softmax."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.finetune import logprobs, preference

BETAS = (0.01, 0.1, 0.5, 1.0, 5.0)


def pairs(seed=0, B=6):
  """Random sequence log-probs of [chosen, rejected] under a policy and a reference, and response lengths."""
  rng = np.random.default_rng(seed)
  policy_BP = jnp.asarray(-rng.uniform(5, 40, (B, 2)), jnp.float32)
  reference_BP = policy_BP + jnp.asarray(rng.normal(0, 2, (B, 2)), jnp.float32)
  tokens_BP = jnp.asarray(rng.integers(3, 20, (B, 2)), jnp.float32)
  return policy_BP, reference_BP, tokens_BP


@pytest.mark.parametrize('beta', BETAS)
def test_at_initialisation_sigmoid_is_ln2_and_ipo_its_closed_form(beta):
  policy_BP, _, tokens_BP = pairs()
  loss_B, metrics = preference.dpo_loss(policy_BP, policy_BP, beta)
  np.testing.assert_allclose(loss_B, math.log(2), rtol=1e-6)
  assert float(jnp.abs(metrics['reward_margin']).max()) == 0.0 and float(metrics['reward_accuracy'].sum()) == 0.0
  loss_B, _ = preference.dpo_loss(policy_BP, policy_BP, beta, 'ipo', tokens_BP=tokens_BP)
  np.testing.assert_allclose(loss_B, (1 / (2 * beta)) ** 2, rtol=1e-6)
  loss_B, _ = preference.dpo_loss(policy_BP, policy_BP, beta, 'hinge')
  np.testing.assert_allclose(loss_B, 1.0)


@pytest.mark.parametrize('beta,smoothing', [(0.1, 0.0), (0.5, 0.0), (2.0, 0.0), (0.1, 0.2)])
def test_gradient_wrt_the_margin_is_minus_beta_over_2_at_initialisation(beta, smoothing):
  """d loss / d log pi(chosen) = -beta/2 (1 - 2e) and d / d log pi(rejected) the opposite (h = chosen - rejected)."""
  policy_BP, _, _ = pairs(B=1)
  loss = lambda p: preference.dpo_loss(p, policy_BP, beta, label_smoothing=smoothing)[0].sum()
  grad_BP = jax.grad(loss)(policy_BP)
  want = beta / 2 * (1 - 2 * smoothing)
  np.testing.assert_allclose(grad_BP, [[-want, want]], rtol=1e-6)


def test_losses_match_trl_formulas():
  """TRL's DPOTrainer formulas written in torch (trl 1.16 sigmoid/hinge/ipo, trl 0.x's label-smoothed sigmoid)."""
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  policy_BP, reference_BP, tokens_BP = pairs(seed=1)
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
  chosen_logratios = t(policy_BP[:, 0]) - t(reference_BP[:, 0])
  rejected_logratios = t(policy_BP[:, 1]) - t(reference_BP[:, 1])
  delta = chosen_logratios - rejected_logratios
  for beta in (0.1, 0.7):
    ls = 0.15
    want = {
        'sigmoid': -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls,
        'hinge': torch.relu(1 - beta * delta),
        'ipo': (chosen_logratios / t(tokens_BP[:, 0]) - rejected_logratios / t(tokens_BP[:, 1]) - 1 / (2 * beta)) ** 2,
    }
    for loss_type, expected in want.items():
      loss_B, metrics = preference.dpo_loss(policy_BP, reference_BP, beta, loss_type,
                                            label_smoothing=ls if loss_type == 'sigmoid' else 0.0, tokens_BP=tokens_BP)
      np.testing.assert_allclose(loss_B, expected.numpy(), rtol=2e-5, atol=1e-6, err_msg=loss_type)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    np.testing.assert_allclose(metrics['reward_chosen'], chosen_rewards.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics['reward_rejected'], rejected_rewards.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics['reward_margin'], (chosen_rewards - rejected_rewards).numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(metrics['reward_accuracy'], (chosen_rewards > rejected_rewards).double().numpy())


def test_a_hand_computed_pair():
  """Policy gained 1 nat on chosen and lost 2 on rejected: h = 3; beta 0.5 -> loss log(1 + e^-1.5)."""
  policy_BP = jnp.asarray([[-9.0, -12.0]])
  reference_BP = jnp.asarray([[-10.0, -10.0]])
  loss_B, metrics = preference.dpo_loss(policy_BP, reference_BP, 0.5)
  np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-1.5))], rtol=1e-6)
  assert metrics['reward_chosen'].tolist() == [0.5] and metrics['reward_rejected'].tolist() == [-1.0]
  assert metrics['reward_margin'].tolist() == [1.5] and metrics['reward_accuracy'].tolist() == [1.0]
  loss_B, _ = preference.dpo_loss(policy_BP, reference_BP, 0.5, 'hinge')
  assert loss_B.tolist() == [0.0]  # beta h = 1.5 is past the hinge


@pytest.mark.parametrize('kwargs,message', [
    (dict(loss_type='kto'), 'not one of sigmoid, ipo, hinge'), (dict(beta=0.0), 'must be positive'),
    (dict(label_smoothing=0.5), r'\[0, 0.5\)'), (dict(loss_type='hinge', label_smoothing=0.1), 'sigmoid loss only'),
    (dict(loss_type='ipo'), 'pass tokens_BP')])
def test_bad_settings_are_one_line_errors(kwargs, message):
  policy_BP, reference_BP, _ = pairs()
  with pytest.raises(ValueError, match=message):
    preference.dpo_loss(policy_BP, reference_BP, **{'beta': 0.1, **kwargs})


def test_bradley_terry_loss_accuracy_and_gradient():
  scores_BP = jnp.asarray([[2.0, -1.0], [0.5, 0.5], [-1.0, 1.0]])
  loss_B, accuracy_B = preference.bradley_terry_loss(scores_BP)
  np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-3)), math.log(2), math.log1p(math.exp(2))], rtol=1e-6)
  assert accuracy_B.tolist() == [1.0, 0.0, 0.0]  # a tie is not a correct ranking
  grad_BP = jax.grad(lambda s: preference.bradley_terry_loss(s)[0].sum())(scores_BP)
  np.testing.assert_allclose(grad_BP[1], [-0.5, 0.5], rtol=1e-6)  # -sigmoid(-(c - r)) at a tie


def test_sequence_logprobs_sum_response_tokens_only():
  rng = np.random.default_rng(0)
  logits_BPLV = jnp.asarray(rng.normal(0, 3, (3, 2, 7, 11)), jnp.float32)
  targets_BPL = jnp.asarray(rng.integers(0, 11, (3, 2, 7)), jnp.int32)
  weights_BPL = jnp.asarray(np.arange(7) >= 3, jnp.float32) * jnp.ones((3, 2, 1))  # 3 prompt tokens masked
  want_BPL = jnp.take_along_axis(jax.nn.log_softmax(logits_BPLV, -1), targets_BPL[..., None], -1)[..., 0]
  np.testing.assert_allclose(logprobs.token_logprobs(logits_BPLV, targets_BPL), want_BPL, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logprobs.sequence_logprobs(logits_BPLV, targets_BPL, weights_BPL),
                             want_BPL[..., 3:].sum(-1), rtol=1e-5, atol=1e-5)
