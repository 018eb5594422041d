"""Pairwise preference losses: DPO against a frozen reference (sigmoid, IPO, hinge) and Bradley-Terry reward models.

Arrays ending in P hold one preference pair [chosen, rejected] (P = 2), the layout of the preference batches
([B, 2, L]), so a strided microbatch split never separates a pair. Losses are per pair (shape [B]); the task
weights and sums them for the train step. Formulas follow the papers and TRL's DPOTrainer (trl 1.16,
trl/trainer/dpo_trainer.py), checked in tests/test_preference.py.
"""
import jax
import jax.numpy as jnp

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge')


def dpo_loss(policy_BP, reference_BP, beta: float, loss_type: str = 'sigmoid', label_smoothing: float = 0.0,
             tokens_BP=None) -> tuple[jax.Array, dict]:
  """(loss_B, per-pair metrics) from sequence log-probs of [chosen, rejected] under the policy and the reference.

  With h = (policy - reference)[chosen] - (policy - reference)[rejected] (the log-ratio margin):
  - sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); e = label_smoothing > 0 is conservative DPO
    (Mitchell 2023; TRL 0.x's 'sigmoid' with label_smoothing), e = 0 is DPO (Rafailov 2023).
  - ipo: (h' - 1 / (2 beta))^2 with h' the same margin of per-token averaged log-ratios (`tokens_BP`: the response
    lengths), as TRL does after confirming it with the IPO authors (Azar 2023, eq. 17).
  - hinge: max(0, 1 - beta h) (SLiC, Zhao 2023).
  Metrics (TRL's): implicit rewards beta * (policy - reference) of chosen and rejected, their margin, and reward
  accuracy (chosen's reward strictly higher).
  """
  check_dpo_settings(beta, loss_type, label_smoothing)
  if loss_type == 'ipo' and tokens_BP is None:
    raise ValueError('the ipo loss averages log-ratios over response tokens; pass tokens_BP (response lengths)')
  logratio_BP = policy_BP.astype(jnp.float32) - reference_BP.astype(jnp.float32)
  h_B = logratio_BP[:, 0] - logratio_BP[:, 1]
  if loss_type == 'sigmoid':
    loss_B = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B) - label_smoothing * jax.nn.log_sigmoid(-beta * h_B)
  elif loss_type == 'hinge':
    loss_B = jax.nn.relu(1 - beta * h_B)
  else:
    mean_BP = logratio_BP / jnp.maximum(tokens_BP, 1.0)
    loss_B = jnp.square(mean_BP[:, 0] - mean_BP[:, 1] - 1 / (2 * beta))
  rewards_BP = beta * jax.lax.stop_gradient(logratio_BP)
  margin_B = rewards_BP[:, 0] - rewards_BP[:, 1]
  return loss_B, {'reward_chosen': rewards_BP[:, 0], 'reward_rejected': rewards_BP[:, 1], 'reward_margin': margin_B,
                  'reward_accuracy': (margin_B > 0).astype(jnp.float32)}


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
  """One-line errors for settings no DPO loss accepts (checked before a model is built, and by dpo_loss)."""
  if loss_type not in DPO_LOSSES:
    raise ValueError(f'finetune.dpo_loss={loss_type!r} is not one of {", ".join(DPO_LOSSES)}')
  if beta <= 0:
    raise ValueError(f'finetune.dpo_beta={beta} must be positive (0.1 is the usual value)')
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'finetune.dpo_label_smoothing={label_smoothing} must lie in [0, 0.5) (the assumed share of '
                     'flipped labels)')
  if label_smoothing and loss_type != 'sigmoid':
    raise ValueError(f'finetune.dpo_label_smoothing applies to the sigmoid loss only, not {loss_type!r}; set it to 0')


def bradley_terry_loss(scores_BP) -> tuple[jax.Array, jax.Array]:
  """(loss_B, accuracy_B): -log sigmoid(r_chosen - r_rejected) of a reward model's scalar scores, and whether it
  ranks the pair right (a tie is wrong, so an untrained constant scorer has accuracy 0, not 0.5)."""
  diff_B = scores_BP[:, 0].astype(jnp.float32) - scores_BP[:, 1].astype(jnp.float32)
  return -jax.nn.log_sigmoid(diff_B), (diff_B > 0).astype(jnp.float32)
