"""Model, optimizer, mesh, shardings and jitted steps built from a config and a task; shared by training and
benchmarks."""
import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from lmlab import sharding
from lmlab.models import ModelConfig, moe
from lmlab.train import optim, state as state_lib, step as step_lib, task as task_lib


@dataclasses.dataclass
class TrainingParts:
  config: Any
  model_config: ModelConfig
  mesh: Mesh
  rules: tuple
  model: Any                     # the task's model (Transformer for pretraining), with dropout when model.dropout > 0
  eval_model: Any                # the same, always deterministic
  tx: Any
  schedule: Callable
  shardings: state_lib.TrainState
  train_step: Callable           # jitted (state, batch) -> (state, metrics), state donated
  task: Any                      # what is trained (lmlab/train/task.py lists its methods)

  def create_state(self) -> state_lib.TrainState:
    """A fresh state; with config.init_from, the task's pretrained weights put in place on their shardings."""
    weights = self.task.pretrained_weights(self.abstract_state()) if self.config.init_from else None
    return state_lib.create_train_state(self.model, self.tx, self.config.seed, self.config.seq_len, self.shardings,
                                        weights)

  def abstract_state(self) -> state_lib.TrainState:
    return state_lib.abstract_state(self.model, self.tx, self.config.seed, self.config.seq_len, self.shardings)

  def context(self) -> contextlib.ExitStack:
    """Mesh and logical rules in scope while tracing, so activation constraints and shard_map see them."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def jit_eval_step(self) -> Callable:
    """Jitted (params, model_state, batch) -> the task's summed eval counts."""
    return jax.jit(self.task.eval_fn(),
                   in_shardings=(self.shardings.params, self.shardings.model_state, sharding.batch_sharding(self.mesh)),
                   out_shardings=sharding.replicated(self.mesh))


def build(config, devices=None, task=None) -> TrainingParts:
  """Checks the config against the devices (one-line errors), then builds every training part around `task`
  (default: language-model pretraining on config.data with config.model)."""
  if task is None and config.finetune.task:
    raise ValueError(f'finetune.task={config.finetune.task} needs its task: pass '
                     'lmlab.finetune.tasks.make_task(config) as `task` (experiments.finetune does)')
  task = task or task_lib.LanguageModelTask(config)
  moe.check_router_trains(task.model_config.moe)
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  if config.batch_size % config.microbatches:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by microbatches={config.microbatches}')
  sharding.check_batch_divides(config.batch_size // config.microbatches, mesh,
                               'batch_size' if config.microbatches == 1 else 'batch_size / microbatches')
  schedule = optim.learning_rate_schedule(config)
  tx = optim.make_optimizer(config)
  shardings = state_lib.state_shardings(task.model, tx, config.seed, config.seq_len, mesh, rules)
  train_step = jax.jit(step_lib.make_train_step(task.model, tx, schedule, config, task.loss_fn()),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return TrainingParts(config, task.model_config, mesh, rules, task.model, task.eval_model, tx, schedule, shardings,
                       train_step, task)
