"""GRPO's loss: group-normalised advantages, the clipped importance-ratio objective, a k3 KL penalty to a reference.

Rewards are [N, G]: N prompts (groups) of G samples each. Per-token arrays are [B, L] with B = N * G rows in
group-major order (a prompt's G samples are consecutive rows). Formulas follow DeepSeekMath (Shao 2024), DAPO
(Yu 2025, asymmetric clipping, token-level normalisation) and TRL's GRPOTrainer (trl 1.16), checked in
tests/test_grpo_loss.py.
"""
import jax
import jax.numpy as jnp

NORMALIZATIONS = ('token', 'sequence')
# Added to the group's standard deviation before dividing (TRL's value): a nearly constant group gets large but
# finite advantages rather than a division by ~0.
STD_EPSILON = 1e-4


def zero_variance_groups(rewards_NG) -> jax.Array:
  """[N] bool: groups whose G rewards are all equal (they carry no learning signal)."""
  return jnp.all(rewards_NG == rewards_NG[:, :1], axis=-1)


def group_advantages(rewards_NG, scale: bool = True) -> jax.Array:
  """[N, G] advantages (r - group mean) / (group std + STD_EPSILON); exactly 0 for a group of equal rewards.

  The std is Bessel-corrected (ddof 1), as torch.std and TRL compute it, so rewards {1, 0} give
  +-0.5 / (sqrt(0.5) + 1e-4) = +-0.70700. `scale=False` keeps r - mean (Dr. GRPO: no division by the std).
  """
  if rewards_NG.ndim != 2 or rewards_NG.shape[1] < 2:
    raise ValueError(f'GRPO rewards have shape {rewards_NG.shape}; they need [prompts, samples] with at least 2 '
                     'samples per prompt (group size >= 2): advantages compare the samples of one prompt')
  rewards_NG = rewards_NG.astype(jnp.float32)
  centred_NG = rewards_NG - jnp.mean(rewards_NG, axis=-1, keepdims=True)
  if scale:
    centred_NG = centred_NG / (jnp.std(rewards_NG, axis=-1, ddof=1, keepdims=True) + STD_EPSILON)
  # The mean of equal floats can differ from them in the last bit; such a group has no signal at all.
  return jnp.where(zero_variance_groups(rewards_NG)[:, None], 0.0, centred_NG)


def k3_kl(policy_BL, reference_BL) -> jax.Array:
  """Per-token KL(policy || reference) estimate exp(r - p) - (r - p) - 1 of sampled tokens' log-probs (Schulman's
  k3): unbiased under the policy's samples, never negative, 0 where the two agree. expm1 keeps it exact near 0."""
  d_BL = reference_BL.astype(jnp.float32) - policy_BL.astype(jnp.float32)
  return jnp.expm1(d_BL) - d_BL


def token_loss(policy_BL, old_BL, advantages_B, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
               beta: float = 0.0, reference_BL=None) -> tuple[jax.Array, dict]:
  """(loss_BL, per-token metrics) of the clipped objective -min(ratio A, clip(ratio, 1 - e_low, 1 + e_high) A)
  + beta k3, with ratio = exp(policy - old) of the sampled tokens' log-probs (old: the policy that sampled them,
  held constant). Metrics: 'clipped' (the clip is active: ratio under 1 - e_low with A < 0 or over 1 + e_high with
  A > 0, as TRL counts it) and 'kl' (k3, when a reference is given)."""
  if epsilon_low < 0 or epsilon_high < 0 or epsilon_low >= 1:
    raise ValueError(f'GRPO clip epsilons low={epsilon_low}, high={epsilon_high} must be >= 0 and low < 1 '
                     '(0.2 is the usual value; DAPO raises high to 0.28)')
  if beta < 0:
    raise ValueError(f'GRPO beta={beta} (the KL weight) must be >= 0')
  if beta and reference_BL is None:
    raise ValueError(f'GRPO beta={beta} needs the reference log-probs for its KL term; pass reference_BL or set beta 0')
  ratio_BL = jnp.exp(policy_BL.astype(jnp.float32) - old_BL.astype(jnp.float32))
  a_B1 = advantages_B.astype(jnp.float32)[:, None]
  clipped_ratio_BL = jnp.clip(ratio_BL, 1 - epsilon_low, 1 + epsilon_high)
  loss_BL = -jnp.minimum(ratio_BL * a_B1, clipped_ratio_BL * a_B1)
  clipped_BL = ((ratio_BL < 1 - epsilon_low) & (a_B1 < 0)) | ((ratio_BL > 1 + epsilon_high) & (a_B1 > 0))
  metrics = {'clipped': clipped_BL.astype(jnp.float32)}
  if reference_BL is not None:
    metrics['kl'] = k3_kl(policy_BL, reference_BL)
    loss_BL = loss_BL + beta * metrics['kl']
  return loss_BL, metrics


def loss_weights(mask_BL, normalization: str) -> jax.Array:
  """Per-token weights whose weighted sum of `token_loss` divided by their own sum is the GRPO loss.

  - 'token': the response mask; the loss is the mean over every response token of the batch (DAPO; TRL's 'dapo'
    and 'bnpo'), so long responses weigh more and the per-token signal does not shrink with length.
  - 'sequence': mask / response length; the mean over each response's tokens, then over responses (DeepSeekMath;
    TRL's 'grpo'), every response counting once whatever its length.
  Either way the weights sum to the normaliser, which is what the train step divides by (so microbatching is exact).
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'GRPO loss normalization {normalization!r} is not one of {", ".join(NORMALIZATIONS)}')
  mask_BL = mask_BL.astype(jnp.float32)
  if normalization == 'token':
    return mask_BL
  return mask_BL / jnp.maximum(jnp.sum(mask_BL, axis=-1, keepdims=True), 1.0)
