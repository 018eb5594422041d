"""`run(config, workdir)` for fine-tuning: the training loop of lmlab.train.loop with the task's data and metrics.

build.build() already gives the task's model, optimizer (frozen weights masked) and steps; what the
loop needs besides is the task's tokenizer, batches, eval summary and metadata, supplied here by a
Trainer subclass. At the end the merged weights (LoRA folded in) are exported for --pretrained use.
"""
import json
import math
import os

import jax
import numpy as np

from lmlab.train import loop


class FinetuneTrainer(loop.Trainer):
  """loop.Trainer whose tokenizer, batches and evaluation come from `parts.task`."""

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    self.task = self.parts.task
    if self.task is None:
      raise ValueError('finetune.task is empty; set it to classify, sft, dpo or reward (or use experiments.train to '
                       'pretrain)')
    self.tokenizer = self.task.tokenizer
    self.eval_step = self.parts.jit_eval_step(self.tokenizer.token_bytes())
    self.batches = lambda split, shuffle: self.task.batches(split, shuffle)
    self.tokenizer_info = self._save_tokenizer()

  def _save_tokenizer(self) -> dict:
    """The tokenizer as WORKDIR/tokenizer.json (a GGUF's lives inside the model file), for generate --workdir."""
    info = {**self.tokenizer.to_dict(), 'chat_template': getattr(self.tokenizer, 'chat_template', None),
            'add_bos': bool(getattr(self.tokenizer, 'add_bos', False))}
    inner = getattr(self.tokenizer, 'tokenizer', None)
    if info['kind'] == 'hf' and hasattr(inner, 'save'):
      info['source'] = os.path.join(os.path.abspath(self.workdir), 'tokenizer.json')
      if self.is_main:
        inner.save(info['source'])
    return info

  def pretrained_state(self, path: str):
    """The task's create_state already put init_from's weights in place (head and adapters freshly initialised)."""
    del path
    return self.parts.create_state()

  def metadata(self) -> dict:
    return {**super().metadata(), 'tokenizer': self.tokenizer_info, 'finetune': self.task.metadata()}

  def eval_batches(self):
    """Up to eval_batches batches of one pass over the validation split (never an example twice)."""
    batches = self.task.batches(self.config.data.eval_split, shuffle=False, repeat=False)
    return [b for _, b in zip(range(self.config.eval_batches), batches)]

  def summarize_eval(self, sums) -> dict:
    """The task's metrics (accuracy, macro-F1, confusion matrix for classification) from the summed counts."""
    return self.task.summarize_eval(jax.tree.map(lambda x: float(x) if np.ndim(x) == 0 else np.asarray(x), sums))

  def unigram_entropy(self) -> float:
    """Classification: entropy of the validation labels (the loss of the best constant guess); DPO and reward
    models: ln 2 (their loss at the start); SFT: as pretraining."""
    if self.task.kind in ('dpo', 'reward'):
      return math.log(2)  # the loss of a policy equal to its reference, or of a scorer that ties every pair
    if self.task.kind != 'classify':
      return super().unigram_entropy()
    counts = np.bincount([y for _, y in self.task.eval_rows], minlength=len(self.task.label_names))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def export(workdir: str) -> str:
  """The run's latest intact checkpoint, LoRA merged, as an lmlab Orbax export in WORKDIR/export."""
  from lmlab import convert  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), 'export')
  convert.export(workdir, 'orbax', path)
  return path


def run(config, workdir: str) -> dict:
  """Fine-tunes, then (finetune.export) exports the merged weights; returns the summary with the task's baseline."""
  trainer = FinetuneTrainer(config, workdir)
  summary = trainer.train()
  if trainer.task.kind == 'classify':
    summary.update(trainer.task.baseline())
  if config.finetune.export and config.checkpoint_every:
    # Every process: reading the checkpoint and writing the export are Orbax collectives (barriers), so process 0
    # alone would wait for the others forever; Orbax has only process 0 write the (replicated) arrays.
    summary['export'] = export(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
