"""Reward modelling as a fine-tuning task: a scalar head on a decoder or an encoder, Bradley-Terry on preference pairs.

The model is the classification model with one output (finetune.pooling pools the hidden states of the whole
rendered exchange, prompt and response); pairs are batched [B, 2, L] (chosen, rejected) like DPO's, so the
strided microbatch split keeps them together. Eval: the loss and pairwise accuracy over validation pairs. The
export is a classification export with one class, which `lmlab.rewards` loads as a scorer.
"""
import math

import jax.numpy as jnp
import numpy as np

from lmlab.finetune import chat, data, preference, preference_data, tasks
from lmlab.train import loop

LABELS = ['reward']  # one output: the scalar reward


def exchange_text(tokenizer, prompt: str, response: str) -> str:
  """The prompt and response as the model reads them: its chat template (or the plain fallback)."""
  return chat.render(tokenizer, [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response}],
                     add_generation_prompt=False)


def pair_scores(model, variables, batch, rngs=None):
  """([B, 2] rewards of chosen and rejected, aux) from one forward pass over the 2B rows."""
  flat = lambda x: x.reshape(-1, x.shape[-1])
  scores_B1, aux = model.apply(variables, flat(batch['inputs']), flat(batch['positions']), flat(batch['segment_ids']),
                               rngs=rngs)
  return scores_B1.reshape(batch['inputs'].shape[:2]), aux


def reward_loss_fn(model):
  """(params, model_state, batch, rng) -> (loss sum, loss sum, aux): pair-weighted Bradley-Terry loss."""
  def loss_fn(params, model_state, batch, rng):
    scores_BP, aux = pair_scores(model, {'params': params, **model_state}, batch, {'dropout': rng})
    loss_B, accuracy_B = preference.bradley_terry_loss(scores_BP)
    w_B = batch['weights']
    loss_sum = jnp.sum(loss_B * w_B)
    return loss_sum, loss_sum, {**aux, 'reward/accuracy': jnp.sum(accuracy_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)}
  return loss_fn


def reward_eval_fn(model):
  """(params, model_state, batch) -> summed loss, pair count, correctly ranked pairs and summed margin."""
  def eval_fn(params, model_state, batch):
    scores_BP, _ = pair_scores(model, {'params': params, **model_state}, batch)
    loss_B, accuracy_B = preference.bradley_terry_loss(scores_BP)
    w_B = batch['weights']
    return {'loss_sum': jnp.sum(loss_B * w_B), 'pairs': jnp.sum(w_B), 'correct': jnp.sum(accuracy_B * w_B),
            'margin': jnp.sum((scores_BP[:, 0] - scores_BP[:, 1]) * w_B)}
  return eval_fn


def summarize(sums) -> dict:
  """Eval loss, pairwise accuracy (also as eval_accuracy, which progress lines show) and mean reward margin."""
  pairs = max(float(sums['pairs']), 1.0)
  accuracy = float(sums['correct']) / pairs
  return {'eval_loss': float(sums['loss_sum']) / pairs, 'eval_pairwise_accuracy': accuracy, 'eval_accuracy': accuracy,
          'eval_reward_margin': float(sums['margin']) / pairs, 'eval_pairs': float(sums['pairs'])}


class RewardTask(tasks.Task):
  """finetune.task=reward: a decoder or encoder with a scalar head learns to rank chosen over rejected."""
  kind = 'reward'

  def setup_data(self) -> list[str]:
    self.pairs, self.skipped = {}, {}
    for split in dict.fromkeys((self.config.data.train_split, self.config.data.eval_split)):
      rows, skipped = [], {'identical': 0, 'truncated': 0}
      for record, where in preference_data.read_records(self.config, split):
        prompt, chosen, rejected = (preference_data.text_field(record, k, where)
                                    for k in (self.config.finetune.prompt_key, *preference_data.FIELDS))
        if chosen == rejected:
          skipped['identical'] += 1
          continue
        pair = tuple(data.encode_for_classification(self.tokenizer, exchange_text(self.tokenizer, prompt, r),
                                                    self.config.seq_len) for r in (chosen, rejected))
        if pair[0] == pair[1]:  # seq_len cut away the replies' difference
          skipped['truncated'] += 1
          continue
        rows.append(pair)
      self.pairs[split], self.skipped[split] = rows, skipped
      if any(skipped.values()):
        loop.log(f'{split}: skipped preference pairs {skipped} (identical replies, or identical once cut to '
                 f'seq_len={self.config.seq_len}); {len(rows)} kept')
    return LABELS

  def _row(self, ids) -> dict[str, np.ndarray]:
    L, n = self.config.seq_len, len(ids)
    inputs = np.full(L, self.tokenizer.pad_id or 0, np.int32)
    inputs[:n] = ids
    return {'inputs': inputs, 'positions': np.arange(L, dtype=np.int32),
            'segment_ids': (np.arange(L) < n).astype(np.int32)}

  def _pair(self, chosen, rejected) -> dict[str, np.ndarray]:
    rows = [self._row(chosen), self._row(rejected)]
    return {**{k: np.stack([r[k] for r in rows]) for k in rows[0]}, 'weights': np.float32(1.0 if chosen else 0.0)}

  def batches(self, split: str, shuffle: bool, repeat: bool = True):
    pairs = self.pairs[split]
    return data.Batches(len(pairs), lambda i: self._pair(*pairs[i]), self._pair([], []), self.config.batch_size,
                        self.config.seed, shuffle, repeat)

  def loss_fn(self):
    return reward_loss_fn(self.model)

  def eval_fn(self):
    return reward_eval_fn(self.eval_model)

  def summarize_eval(self, sums) -> dict:
    return summarize(sums)

  def baseline_loss(self, validation) -> float:
    del validation
    return math.log(2)  # the loss of a scorer that ties every pair

  def finetune_metadata(self) -> dict:
    return {**super().finetune_metadata(), 'pooling': self.config.finetune.pooling, 'skipped_pairs': self.skipped}
