"""DPO as a fine-tuning task: preference pairs batched [B, 2, L] against a frozen reference, through the one train step.

The reference (lmlab/finetune/reference.py) is the model as training starts: LoRA's base with the adapters off,
or a copy of the initial weights with full fine-tuning. Pairs stay together under the strided microbatch split
because the pair is an inner axis; `weights` is one per pair, so losses and metrics are means over pairs.
"""
import math

import jax
import jax.numpy as jnp

from lmlab.finetune import data, logprobs, preference, preference_data, reference, tasks
from lmlab.train import loop

METRICS = ('reward_chosen', 'reward_rejected', 'reward_margin', 'reward_accuracy')


def pair_logprobs(model, variables, batch, rngs=None):
  """([B, 2] sequence log-probs of the responses, aux) from one forward pass over the 2B rows."""
  flat = lambda x: x.reshape(-1, x.shape[-1])
  logits_BLV, aux = model.apply(variables, flat(batch['inputs']), flat(batch['positions']), flat(batch['segment_ids']),
                                rngs=rngs)
  logits_BPLV = logits_BLV.reshape(*batch['inputs'].shape, -1)
  return logprobs.sequence_logprobs(logits_BPLV, batch['targets'], batch['response']), aux


def dpo_terms(model, eval_model, params, model_state, batch, settings, rng=None):
  """(loss_B, per-pair metrics, aux) of a batch: the policy with dropout, the reference deterministic and constant."""
  policy_BP, aux = pair_logprobs(model, {'params': params, **model_state}, batch,
                                 rngs=None if rng is None else {'dropout': rng})
  reference_BP, _ = pair_logprobs(eval_model, model.reference_variables(model_state), batch)
  loss_B, metrics = preference.dpo_loss(policy_BP, jax.lax.stop_gradient(reference_BP),
                                        tokens_BP=jnp.sum(batch['response'], -1), **settings)
  return loss_B, metrics, aux


def dpo_loss_fn(model, eval_model, settings: dict):
  """(params, model_state, batch, rng) -> (loss sum, loss sum, aux): the pair-weighted DPO loss; aux carries the
  batch's mean rewards, margin and accuracy under 'dpo/' (the step logs aux beside the MoE metrics)."""
  def loss_fn(params, model_state, batch, rng):
    loss_B, metrics, aux = dpo_terms(model, eval_model, params, model_state, batch, settings, rng)
    w_B = batch['weights']
    pairs = jnp.maximum(jnp.sum(w_B), 1.0)
    loss_sum = jnp.sum(loss_B * w_B)
    return loss_sum, loss_sum, {**aux, **{f'dpo/{k}': jnp.sum(metrics[k] * w_B) / pairs for k in METRICS}}
  return loss_fn


def dpo_eval_fn(model, eval_model, settings: dict):
  """(params, model_state, batch) -> summed loss, pair count and summed metrics."""
  def eval_fn(params, model_state, batch):
    loss_B, metrics, _ = dpo_terms(eval_model, eval_model, params, model_state, batch, settings)
    w_B = batch['weights']
    return {'loss_sum': jnp.sum(loss_B * w_B), 'pairs': jnp.sum(w_B), **{k: jnp.sum(metrics[k] * w_B) for k in METRICS}}
  return eval_fn


def summarize(sums) -> dict:
  """Eval metrics: mean DPO loss, rewards, margin and reward accuracy over the validation pairs."""
  pairs = max(float(sums['pairs']), 1.0)
  return {'eval_loss': float(sums['loss_sum']) / pairs, 'eval_pairs': float(sums['pairs']),
          **{f'eval_{k}': float(sums[k]) / pairs for k in METRICS}}


class DpoTask(tasks.SftTask):
  """finetune.task=dpo: a decoder learns preference pairs {prompt, chosen, rejected} by DPO (finetune.dpo_*)."""
  kind = 'dpo'
  model_class = reference.ReferencedModel

  def __init__(self, config):
    f = config.finetune
    self.settings = dict(beta=f.dpo_beta, loss_type=f.dpo_loss, label_smoothing=f.dpo_label_smoothing)
    preference.check_dpo_settings(**self.settings)  # before the model is loaded
    super().__init__(config)

  def setup_data(self) -> list[str]:
    if self.model_config.family != 'decoder':
      raise ValueError(f'finetune.task={self.kind} needs a causal decoder; init_from is an {self.model_config.family}')
    self.pairs = {split: preference_data.encode(self.config, self.tokenizer, split)
                  for split in dict.fromkeys((self.config.data.train_split, self.config.data.eval_split))}
    for split, encoded in self.pairs.items():
      if any(encoded.skipped.values()):
        loop.log(f'{split}: skipped preference pairs {encoded.skipped} (identical replies, or no reply token '
                 f'within seq_len={self.config.seq_len}); {len(encoded.pairs)} kept')
    return []

  def batches(self, split: str, shuffle: bool, repeat: bool = True):
    pairs = self.pairs[split].pairs
    return data.Batches(len(pairs), lambda i: preference_data.pair_row(self._row, *pairs[i]),
                        preference_data.pair_row(self._row, None, None), self.config.batch_size, self.config.seed,
                        shuffle, repeat)

  def loss_fn(self):
    return dpo_loss_fn(self.model, self.eval_model, self.settings)

  def eval_fn(self):
    return dpo_eval_fn(self.model, self.eval_model, self.settings)

  def summarize_eval(self, sums) -> dict:
    return summarize(sums)

  def baseline_loss(self, validation) -> float:
    del validation
    return math.log(2)  # the loss of a policy equal to its reference

  def finetune_metadata(self) -> dict:
    return {**super().finetune_metadata(), 'dpo': self.settings,
            'skipped_pairs': {split: p.skipped for split, p in self.pairs.items()}}
