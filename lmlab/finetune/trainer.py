"""`run(config, workdir)` for fine-tuning: lmlab.train's loop given the task `finetune.task` names, then the export.

At the end the merged weights (LoRA folded in) are exported for --pretrained use.
"""
import json
import os

import jax

from lmlab.finetune import tasks
from lmlab.train import loop


def export(workdir: str) -> str:
  """The run's latest intact checkpoint, LoRA merged, as an lmlab Orbax export in WORKDIR/export."""
  from lmlab import convert  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), 'export')
  convert.export(workdir, 'orbax', path)
  return path


def run(config, workdir: str) -> dict:
  """Fine-tunes, then (finetune.export) exports the merged weights; returns the summary with the task's baseline."""
  if not config.finetune.task:
    raise ValueError('finetune.task is empty; set it to classify, sft, dpo, reward or grpo (or use experiments.train '
                     'to pretrain)')
  task = tasks.make_task(config)
  summary = loop.Trainer(config, workdir, task).train()
  if task.kind == 'classify':
    summary.update(task.baseline())
  if config.finetune.export and config.checkpoint_every:
    # Every process: reading the checkpoint and writing the export are Orbax collectives (barriers), so process 0
    # alone would wait for the others forever; Orbax has only process 0 write the (replicated) arrays.
    summary['export'] = export(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
