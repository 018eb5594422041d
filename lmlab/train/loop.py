"""`run(config, workdir)`: build everything from the config, train, evaluate, checkpoint, report."""
import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import logging

from lmlab.data import pipeline, tokenizers
from lmlab.models import model_config_to_dict
from lmlab.train import build, checkpoint, metrics as metrics_lib, step as step_lib


def log(message: str) -> None:
  """One line to the console (process 0) and the absl log."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


class Trainer:
  """Everything a run needs, built once from the config; `train()` runs the loop."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.parts = build.build(config)
    self.tokenizer = tokenizers.tokenizer_from_config(config.data, workdir)
    tokenizers.check_vocab(self.parts.model_config.vocab_size, self.tokenizer)
    self.eval_step = self.parts.jit_eval_step(self.tokenizer.token_bytes())
    self.batches = lambda split, shuffle: pipeline.make_batches(
        config.data, self.tokenizer, split=split, global_batch_size=config.batch_size, seq_len=config.seq_len,
        seed=config.seed, shuffle=shuffle, process_index=jax.process_index(), process_count=jax.process_count())
    self.checkpointer = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main)

  def metadata(self) -> dict:
    return {'model': model_config_to_dict(self.parts.model_config), 'tokenizer': self.tokenizer.to_dict()}

  def restore_or_init(self, train_iter):
    step = self.checkpointer.latest_step()
    if step is None:
      log(f'starting from scratch (no checkpoint in {self.checkpointer.directory})')
      return self.parts.create_state()
    state, data_state = self.checkpointer.restore(step, self.parts.abstract_state())
    train_iter.set_state(data_state)
    log(f'resumed from step {step} ({os.path.join(self.checkpointer.directory, str(step))})')
    return state

  def eval_batches(self):
    eval_iter = self.batches(self.config.data.eval_split, shuffle=False)
    return [next(eval_iter) for _ in range(self.config.eval_batches)]

  def evaluate(self, state) -> dict:
    sums = None
    for batch in self.eval_batches():
      out = self.eval_step(state.params, state.model_state, pipeline.to_global(batch, self.parts.mesh))
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    return step_lib.summarize_eval(jax.tree.map(float, jax.device_get(sums)))

  def unigram_entropy(self) -> float:
    """Entropy (nats/token) of the validation targets' own unigram distribution: the loss to beat.

    Fit on the very tokens it is scored on, so it is a lower bound for any unigram model.
    """
    counts = np.zeros(self.tokenizer.vocab_size)
    for batch in self.eval_batches():
      np.add.at(counts, batch['targets'].ravel(), batch['weights'].ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

  def save(self, state, train_iter, force=False):
    self.checkpointer.save(int(state.step), state, train_iter.get_state(), json.loads(self.config.to_json()),
                           self.metadata(), force=force)

  def train(self) -> dict:
    c = self.config
    start_time = time.time()
    fingerprint = pipeline.corpus_fingerprint(c.data)
    log(f'corpus {json.dumps(fingerprint)}')
    if self.is_main:
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(c.to_json_best_effort(indent=2))
    train_iter = self.batches(c.data.train_split, shuffle=True)
    with self.parts.context():
      state = self.restore_or_init(train_iter)
      first_step = int(state.step)
      progress = _progress(first_step, c.steps, enabled=c.progress and self.is_main)
      tokens_per_step = c.batch_size * c.seq_len
      pending, tick, last_eval = None, time.time(), {}
      for step in range(first_step, c.steps):
        batch = pipeline.to_global(next(train_iter), self.parts.mesh)
        state, step_metrics = self.parts.train_step(state, batch)
        if pending is not None:  # fetch the previous step's metrics only now: the device never waits on us
          self._report(*pending, progress)
        pending = (step + 1, step_metrics, tick)
        tick = time.time()
        done = step + 1
        if c.eval_every and (done % c.eval_every == 0 or done == c.steps):
          self._report(*pending, progress)
          pending = None
          last_eval = self.evaluate(state)
          self.writer.write(done, last_eval)
          progress.write(f'step {done}: eval loss {last_eval["eval_loss"]:.4f}, '
                         f'bits/byte {last_eval["eval_bits_per_byte"]:.4f}')
        if c.checkpoint_every and done % c.checkpoint_every == 0:
          self.save(state, train_iter)
      if pending is not None:
        self._report(*pending, progress)
      progress.close()
      if c.checkpoint_every and self.checkpointer.latest_step() != int(state.step):
        self.save(state, train_iter, force=True)
    self.checkpointer.close()
    return self._finish(state, last_eval, fingerprint, time.time() - start_time)

  def _report(self, step, step_metrics, tick, progress):
    values = jax.device_get(step_metrics)
    loss = float(values['loss'])
    if not math.isfinite(loss):
      raise FloatingPointError(f'loss is {loss} at step {step}; lower --config.learning_rate or check the data')
    tokens_per_s = self.config.batch_size * self.config.seq_len / max(time.time() - tick, 1e-9)
    progress.update(step - progress.n)
    progress.set_postfix(loss=f'{loss:.4f}', tok_s=f'{tokens_per_s:,.0f}', refresh=False)
    if step % self.config.log_every == 0 or step == self.config.steps:
      self.writer.write(step, {**values, 'tokens_per_s': tokens_per_s})

  def _finish(self, state, last_eval, fingerprint, wall_time) -> dict:
    rows = metrics_lib.read_rows(self.writer.path)
    self.writer.close()
    train_rows = [r for r in rows if 'loss' in r]
    summary = {'step': int(state.step), 'final_train_loss': train_rows[-1]['loss'] if train_rows else None,
               **last_eval, 'unigram_entropy': self.unigram_entropy(), 'corpus': fingerprint, 'wall_time_s': wall_time,
               'num_params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
               'workdir': os.path.abspath(self.workdir)}
    if self.is_main:
      metrics_lib.plot_loss(rows, os.path.join(self.workdir, 'loss.png'))
      loads = [r for r in train_rows if 'moe/load/layer0' in r]
      if loads:
        layers = sorted(k for k in loads[-1] if k.startswith('moe/load/layer'))
        metrics_lib.plot_expert_load(np.array([loads[-1][k] for k in layers]),
                                     os.path.join(self.workdir, 'expert_load.png'))
      with open(os.path.join(self.workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


def _progress(start: int, total: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  interactive = sys.stderr.isatty()
  return tqdm(total=total, initial=start, disable=not enabled, unit='step', dynamic_ncols=True,
              mininterval=0.1 if interactive else 10.0)


def run(config, workdir: str) -> dict:
  return Trainer(config, workdir).train()
