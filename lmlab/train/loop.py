"""`run(config, workdir)`: build everything from the config, train, evaluate, checkpoint, report."""
import functools
import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import logging

from lmlab import distributed
from lmlab.data import pipeline
from lmlab.models import model_config_to_dict
from lmlab.train import build, checkpoint, metrics as metrics_lib, step as step_lib, task as task_lib


def log(message: str) -> None:
  """One line to the console (process 0) and the absl log."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


class Preempted(Exception):
  """SIGTERM or SIGINT stopped training after a step whose checkpoint is saved; the next start resumes there."""

  def __init__(self, step: int, path: str):
    super().__init__(f'preempted at step {step}: checkpoint saved to {path}')
    self.step, self.path = step, path


class Trainer:
  """Everything a run of `task` needs (default: pretraining from config), built once; `train()` runs the loop."""

  def __init__(self, config, workdir: str, task=None):
    self.config, self.workdir = config, workdir
    self.is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.task = task or task_lib.LanguageModelTask(config, workdir)
    self.parts = build.build(config, task=self.task)
    self.tokenizer = self.task.tokenizer
    self.eval_step = self.parts.jit_eval_step()
    self.batches = self.task.batches
    self.checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.is_main)
    self.eval_tasks = _eval_task_specs(config.eval_tasks, self.parts.model_config)
    self.task_metadata = self.task.metadata(workdir)

  def metadata(self) -> dict:
    return {'model': model_config_to_dict(self.parts.model_config), **self.task_metadata}

  def restore_or_init(self, train_iter):
    """The state --config.restore asks for (data iterator positioned to match), else a fresh or pretrained one."""
    own = self.checkpointer
    if self.config.restore == 'none':
      steps = own.steps()
      moved = f'; checkpoints {steps} moved to {own.set_aside(steps)}' if steps else ''
      return self.fresh_state(f'--config.restore=none{moved}')
    source, steps, fall_back = checkpoint.restore_source(self.config.restore, own, log)
    if not steps:
      return self.fresh_state(f'no checkpoint in {own.directory}')
    step, state, data_state = checkpoint.restore_first_intact(source, steps, self.parts.abstract_state(), log,
                                                              fall_back, self.config.verify_checkpoints)
    newer = [s for s in own.steps() if s > step]
    if source is own and newer:  # damaged or abandoned: keep them out of this run's single history
      log(f'checkpoints {newer} (newer than step {step}) moved to {own.set_aside(newer)}')
    train_iter.set_state(data_state)
    self.drop_metrics_after(step)
    log(f'resumed from step {step} ({source.path(step)})')
    if source is not own:
      source.close()
    return state

  def fresh_state(self, why: str):
    """Step 0: random parameters, or --config.init_from's pretrained ones."""
    self.drop_metrics_after(0)
    state = self.parts.create_state()
    pretrained = f' with pretrained weights from {self.config.init_from}' if self.config.init_from else ''
    log(f'starting from scratch{pretrained} ({why})')
    return state

  def drop_metrics_after(self, step: int) -> None:
    """Rows past `step` came from a run that died after its last checkpoint: drop them, keep one clean history."""
    dropped = self.writer.truncate_after(step)
    if dropped:
      log(f'metrics.jsonl: dropped {dropped} rows past step {step}')

  @functools.cached_property
  def validation(self) -> list:
    """The validation batches, built once per run: evaluation is deterministic, so each eval sees the same ones."""
    return self.task.eval_batches(self.config.eval_batches)

  def evaluate(self, state) -> dict:
    sums = None
    for batch in self.validation:
      out = self.eval_step(state.params, state.model_state, pipeline.to_global(batch, self.parts.mesh))
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    return {**self.task.summarize_eval(jax.device_get(sums)), **self.task.eval_metrics(state),
            **self.task_metrics(state)}

  def analysis_model(self, state):
    """The current weights as an lmlab.convert.Pretrained (what evaluation and interpretation tools take)."""
    from lmlab.convert.model import Pretrained  # pylint: disable=g-import-not-at-top
    return Pretrained(self.parts.model_config, state.params, state.model_state, self.tokenizer,
                      f'{self.workdir} step {int(state.step)}', step=int(state.step))

  def task_metrics(self, state) -> dict:
    """config.eval_tasks on the current weights: each task's scalar metrics as eval/<task>/<metric>."""
    if not self.eval_tasks:
      return {}
    from lmlab.eval import tasks  # pylint: disable=g-import-not-at-top
    model, out = self.analysis_model(state), {}
    for spec in self.eval_tasks:
      results, _ = tasks.evaluate_task(model, spec, tasks.Settings(seed=self.config.seed))
      out.update({f'eval/{spec.name}/{k}': float(v) for k, v in results.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out

  def save(self, state, train_iter, eval_loss=None, force=False):
    self.checkpointer.save(int(state.step), state, train_iter.get_state(), json.loads(self.config.to_json()),
                           self.metadata(), eval_loss=eval_loss, force=force)

  def train(self) -> dict:
    """Resumes or starts, trains to config.steps, evaluates and checkpoints; raises Preempted on SIGTERM/SIGINT."""
    c = self.config
    start_time = time.time()
    fingerprint = pipeline.corpus_fingerprint(c.data)
    log(f'corpus {json.dumps(fingerprint)}')
    if self.is_main:
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(c.to_json_best_effort(indent=2))
    train_iter = self.batches(c.data.train_split, shuffle=True)
    try:
      with self.parts.context(), distributed.PreemptionWatch() as watch:
        state = self.restore_or_init(train_iter)
        state, last_eval = self._steps(state, train_iter, watch)
        if c.checkpoint_every and self.checkpointer.latest_step() != int(state.step):
          self.save(state, train_iter, eval_loss=last_eval.get('eval_loss'), force=True)
    finally:
      self.checkpointer.close()  # waits for an async save in flight, even when training failed
    return self._finish(state, last_eval, fingerprint, time.time() - start_time)

  def _steps(self, state, train_iter, watch):
    """The training loop proper: (final state, last eval metrics)."""
    c = self.config
    progress = _progress(int(state.step), c.steps, enabled=c.progress and self.is_main)
    pending, tick, last_eval = None, time.time(), {}
    if c.eval_at_start and c.eval_every and int(state.step) == 0:
      self._evaluate_and_log(state, 0, progress)
    for step in range(int(state.step), c.steps):
      batch, host_metrics = self.task.next_batch(state, train_iter)
      state, step_metrics = self.parts.train_step(state, pipeline.to_global(batch, self.parts.mesh))
      if pending is not None:  # fetch the previous step's metrics only now: the device never waits on us
        self._report(*pending, progress)
      done = step + 1
      pending, tick = (done, {**step_metrics, **host_metrics}, tick), time.time()
      evaluate = c.eval_every and (done % c.eval_every == 0 or done == c.steps)
      save = c.checkpoint_every and done % c.checkpoint_every == 0
      stop = done < c.steps and watch.stop_at(done)
      if evaluate or save or stop:  # rows up to `done` reach metrics.jsonl before its checkpoint does
        self._report(*pending, progress)
        pending = None
      if evaluate:
        last_eval = self._evaluate_and_log(state, done, progress)
      eval_loss = last_eval.get('eval_loss') if evaluate else None
      if stop:
        progress.close()
        log(f'{watch.signal_name} received: saving step {done}, then exiting')
        self.save(state, train_iter, eval_loss=eval_loss, force=True)
        self.checkpointer.wait()
        raise Preempted(done, self.checkpointer.path(done))
      if save:
        self.save(state, train_iter, eval_loss=eval_loss)
    if pending is not None:
      self._report(*pending, progress)
    progress.close()
    return state, last_eval

  def _evaluate_and_log(self, state, step, progress) -> dict:
    metrics = self.evaluate(state)
    self.writer.write(step, metrics)
    if self.is_main:  # tqdm's write prints even when the bar is disabled
      progress.write(f'step {step}: {step_lib.describe_eval(metrics)}')
    return metrics

  def _report(self, step, step_metrics, tick, progress):
    values = jax.device_get(step_metrics)
    loss = float(values['loss'])
    if not math.isfinite(loss):
      raise FloatingPointError(f'loss is {loss} at step {step}; lower --config.learning_rate or check the data')
    self.task.check_metrics(step, values)
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
               **last_eval, 'unigram_entropy': self.task.baseline_loss(self.validation), 'corpus': fingerprint,
               'wall_time_s': wall_time,
               'num_params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
               'workdir': os.path.abspath(self.workdir)}
    if self.is_main:
      metrics_lib.plot_loss(rows, os.path.join(self.workdir, 'loss.png'), baseline=summary['unigram_entropy'])
      load_LE = metrics_lib.expert_load(train_rows[-1]) if train_rows else None
      if load_LE is not None:
        metrics_lib.plot_expert_load(load_LE, os.path.join(self.workdir, 'expert_load.png'))
      with open(os.path.join(self.workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


def _eval_task_specs(spec: str, model_config) -> list:
  """config.eval_tasks parsed with every row checked now, so a bad file fails before training, not at step N."""
  names = [name.strip() for name in spec.split(',') if name.strip()]
  if not names:
    return []
  if model_config.family != 'decoder':
    raise ValueError(f'config.eval_tasks scores with a causal decoder; this model is an {model_config.family}')
  if jax.process_count() > 1:
    raise ValueError('config.eval_tasks runs on one process; evaluate a multi-process run\'s checkpoints with '
                     'python -m experiments.evaluate --pretrained=WORKDIR --task=...')
  from lmlab.eval import tasks  # pylint: disable=g-import-not-at-top
  specs = [tasks.parse_task(name) for name in names]
  for task_spec in specs:
    tasks.read_rows(task_spec)
  return specs


def _progress(start: int, total: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  interactive = sys.stderr.isatty()
  return tqdm(total=total, initial=start, disable=not enabled, unit='step', dynamic_ncols=True,
              mininterval=0.1 if interactive else 10.0)


def run(config, workdir: str) -> dict:
  return Trainer(config, workdir).train()
