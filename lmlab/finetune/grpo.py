"""GRPO's train-step side: a rollout batch (prompts + sampled completions, group advantages) and its loss.

A rollout batch has one row per completion, [B, L] with B = N prompts x G samples in group-major order: the
prompt + completion as inputs/targets/positions/segment_ids (SFT rows), 'response' the completion tokens' mask,
'advantages' [B] (lmlab/finetune/grpo_loss.py) and 'weights' [B, L], the normalisation's token weights, whose sum
the train step divides by (so microbatching stays exact). One inner update per rollout: the policy that sampled
is the one being updated, so the old log-probs are the policy's own with the gradient stopped (ratio 1; the clip
acts only when a rollout is reused, which this does not do). Log-probs are those of the distribution that sampled,
softmax(logits / temperature), for the policy and the reference alike (TRL's convention): the gradient is then the
policy gradient of the sampler and the k3 KL is estimated under its own samples. The KL is to the frozen reference
(lmlab/finetune/reference.py), logged even with beta 0.
"""
import jax
import jax.numpy as jnp
import numpy as np

from lmlab.finetune import grpo_loss, logprobs


def rollout_batch(rows: list[dict], rewards_NG, normalization: str, scale_rewards: bool = True) -> dict:
  """The batch of SFT-style rows (`SftTask._row` of prompt + completion ids with weight 1 on the completion)."""
  rewards_NG = jnp.asarray(rewards_NG, jnp.float32)
  if rewards_NG.size != len(rows):
    raise ValueError(f'{len(rows)} completions but {rewards_NG.size} rewards; give one reward per completion')
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != 'weights'}
  batch['response'] = np.stack([r['weights'] for r in rows])
  batch['advantages'] = np.asarray(grpo_loss.group_advantages(rewards_NG, scale_rewards)).reshape(-1)
  batch['weights'] = np.asarray(grpo_loss.loss_weights(jnp.asarray(batch['response']), normalization))
  return batch


def grpo_loss_fn(model, eval_model, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                 temperature: float = 1.0):
  """(params, model_state, batch, rng) -> (loss sum, loss sum, aux) of a rollout batch sampled at `temperature`;
  aux carries the mean k3 KL and the clipped fraction over response tokens under 'grpo/'."""
  if not temperature > 0:
    raise ValueError(f'GRPO temperature={temperature} must be > 0: rollouts are sampled (greedy ones would give '
                     'every sample of a prompt the same reward, so no signal); 1.0 samples the model as it is')

  def token_logprobs(m, variables, batch, rngs=None):
    logits_BLV, aux = m.apply(variables, batch['inputs'], batch['positions'], batch['segment_ids'], rngs=rngs)
    return logprobs.token_logprobs(logits_BLV / temperature, batch['targets']), aux

  def loss_fn(params, model_state, batch, rng):
    policy_BL, aux = token_logprobs(model, {'params': params, **model_state}, batch, {'dropout': rng})
    reference_BL, _ = token_logprobs(eval_model, model.reference_variables(model_state), batch)
    loss_BL, metrics = grpo_loss.token_loss(policy_BL, jax.lax.stop_gradient(policy_BL), batch['advantages'],
                                            epsilon_low, epsilon_high, beta, jax.lax.stop_gradient(reference_BL))
    loss_sum = jnp.sum(loss_BL * batch['weights'])
    mask_BL = batch['response']
    tokens = jnp.maximum(jnp.sum(mask_BL), 1.0)
    return loss_sum, loss_sum, {**aux, **{f'grpo/{k}': jnp.sum(v * mask_BL) / tokens for k, v in metrics.items()}}
  return loss_fn
