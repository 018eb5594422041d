"""Scalar rewards of (prompt, response) pairs from a reward model trained with finetune.task=reward.

`RewardModel(path)` loads a reward run's workdir (`WORKDIR`, `WORKDIR@best`, `WORKDIR@STEP`) or its export through
lmlab.convert.load_model and scores texts exactly as the task trained on them (the chat rendering of the
exchange, the head's pooling). GRPO's `reward_model:PATH` and the self-improvement loop score through it.
"""
import functools
from typing import Sequence

import jax
import numpy as np

from lmlab import convert
from lmlab.finetune import data
from lmlab.finetune.reward import exchange_text
from lmlab.finetune.tasks import FinetuneModel

LENGTH_BUCKET = 64  # rows are padded to a multiple of this, so a few shapes compile, not one per batch


@functools.partial(jax.jit, static_argnums=0)
def _scores(model, variables, tokens_BL, positions_BL, segment_ids_BL):
  """The head's output per row; compiled once per model and shape (equal models share it)."""
  return model.apply(variables, tokens_BL, positions_BL, segment_ids_BL)[0][:, 0]


class RewardModel:
  """`score(prompts, responses) -> float32 [N]`: higher is better."""

  def __init__(self, path: str, seq_len: int = 512, batch_size: int = 16, pooling: str | None = None):
    pretrained = convert.load_model(path)
    task = pretrained.metadata.get('finetune', {}) if pretrained.metadata else {}
    head = pretrained.params.get('classifier', {}).get('kernel')
    if head is None or head.shape[-1] != 1 or (task and task.get('task') != 'reward'):
      raise ValueError(f'{path} is not a reward model (no one-output head from a finetune.task=reward run)')
    if pretrained.tokenizer is None:
      raise ValueError(f'{path} has no tokenizer; a reward model scores text')
    self.tokenizer, self.seq_len, self.batch_size = pretrained.tokenizer, seq_len, batch_size
    # A workdir's metadata names the pooling; an export does not carry it, so it is an argument (default mean).
    self.model = FinetuneModel(pretrained.config, num_classes=1, pooling=pooling or task.get('pooling', 'mean'))
    self.variables = pretrained.variables

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f'{len(prompts)} prompts but {len(responses)} responses; score them in pairs')
    ids = [data.encode_for_classification(self.tokenizer, exchange_text(self.tokenizer, p, r), self.seq_len)
           for p, r in zip(prompts, responses)]
    scores = []
    for start in range(0, len(ids), self.batch_size):
      chunk = ids[start:start + self.batch_size]
      L = min(self.seq_len, -(-max(len(x) for x in chunk) // LENGTH_BUCKET) * LENGTH_BUCKET)
      tokens = np.full((self.batch_size, L), self.tokenizer.pad_id or 0, np.int32)
      segments = np.zeros((self.batch_size, L), np.int32)
      for i, row in enumerate(chunk):
        tokens[i, :len(row)], segments[i, :len(row)] = row, 1
      positions = np.broadcast_to(np.arange(L, dtype=np.int32), (self.batch_size, L))
      scores.append(np.asarray(_scores(self.model, self.variables, tokens, positions, segments))[:len(chunk)])
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)
