"""Model, optimizer, mesh, shardings and jitted steps built from a config; shared by training and benchmarks."""
import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from lmlab import sharding
from lmlab.models import ModelConfig, Transformer, model_config_from_dict
from lmlab.train import optim, state as state_lib, step as step_lib


@dataclasses.dataclass
class TrainingParts:
  config: Any
  model_config: ModelConfig
  mesh: Mesh
  rules: tuple
  model: Any                     # Transformer (or a task's FinetuneModel), with dropout when model.dropout > 0
  eval_model: Any                # the same, always deterministic
  tx: Any
  schedule: Callable
  shardings: state_lib.TrainState
  train_step: Callable           # jitted (state, batch) -> (state, metrics), state donated
  task: Any = None               # lmlab.finetune.tasks.Task when config.finetune.task is set; None: pretraining

  def create_state(self) -> state_lib.TrainState:
    """A fresh state; a fine-tuning task puts its pretrained weights (init_from) in place."""
    state = state_lib.create_train_state(self.model, self.tx, self.config.seed, self.config.seq_len, self.shardings)
    if self.task is not None:
      state = self.task.load_pretrained(state, self.shardings)
    return state

  def abstract_state(self) -> state_lib.TrainState:
    return state_lib.abstract_state(self.model, self.tx, self.config.seed, self.config.seq_len, self.shardings)

  def context(self) -> contextlib.ExitStack:
    """Mesh and logical rules in scope while tracing, so activation constraints and shard_map see them."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def jit_eval_step(self, token_bytes_V) -> Callable:
    """Jitted (params, model_state, batch) -> summed eval counts; the task's own when it has one."""
    eval_fn = self.task.eval_fn() if self.task is not None else None
    return jax.jit(eval_fn or step_lib.make_eval_step(self.eval_model, token_bytes_V),
                   in_shardings=(self.shardings.params, self.shardings.model_state, sharding.batch_sharding(self.mesh)),
                   out_shardings=sharding.replicated(self.mesh))


def build(config, devices=None) -> TrainingParts:
  """Checks the config against the devices (one-line errors), then builds every training part.

  With `finetune.task` set, the model (and its config) come from the fine-tuning task: the pretrained
  checkpoint `init_from` plus a head and/or LoRA adapters, trained through the same step.
  """
  task = None
  if config.finetune.task:
    from lmlab.finetune import tasks  # pylint: disable=g-import-not-at-top  (fine-tuning only)
    task = tasks.make_task(config)
  model_config = task.model_config if task else model_config_from_dict(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  if config.batch_size % config.microbatches:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by microbatches={config.microbatches}')
  sharding.check_batch_divides(config.batch_size // config.microbatches, mesh,
                               'batch_size' if config.microbatches == 1 else 'batch_size / microbatches')
  model = task.model if task else Transformer(model_config, deterministic=model_config.dropout == 0)
  eval_model = task.eval_model if task else Transformer(model_config, deterministic=True)
  schedule = optim.learning_rate_schedule(config)
  tx = optim.make_optimizer(config)
  shardings = state_lib.state_shardings(model, tx, config.seed, config.seq_len, mesh, rules)
  train_step = jax.jit(step_lib.make_train_step(model, tx, schedule, config, task.loss_fn() if task else None),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return TrainingParts(config, model_config, mesh, rules, model, eval_model, tx, schedule, shardings, train_step, task)
