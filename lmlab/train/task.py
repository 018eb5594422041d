"""What build and the training loop receive: a task's model, loss, batches, tokenizer and evaluation.

Language-model pretraining (`LanguageModelTask`) is one task; the fine-tuning tasks of lmlab/finetune/ (classify,
sft, dpo, reward, grpo) implement the same methods, so lmlab/train/ never imports them. A task has:
  model_config, model, eval_model (deterministic), tokenizer
  loss_fn()                       (params, model_state, batch, rng) -> (loss sum, nll sum, aux) for step.py
  eval_fn()                       (params, model_state, batch) -> summed eval counts
  summarize_eval(sums)            eval metrics from the counts (host values)
  eval_metrics(state)             further eval metrics computed from the weights (e.g. generation); {} for none
  batches(split, shuffle)         this process's batches; an iterator with get_state/set_state (checkpointed)
  eval_batches(n)                 up to n validation batches, the same at every evaluation
  next_batch(state, batches)      (host batch, host metrics) of the next step: the hook a rollout runs in
  check_metrics(step, values)     raises to stop training on a step's metrics (e.g. a diverged policy)
  pretrained_weights(abstract)    {'params/...' or 'model_state/COLLECTION/...': host array} from config.init_from
  baseline_loss(validation)       the eval loss to beat (summary's unigram_entropy)
  metadata(workdir)               checkpoint metadata besides the model config: tokenizer and task settings
"""
import functools

import jax
import numpy as np

from lmlab.data import pipeline, tokenizers
from lmlab.models import Transformer, model_config_from_dict, model_config_to_dict
from lmlab.train import checkpoint, step as step_lib


def unigram_entropy(batches, vocab_size: int) -> float:
  """Entropy (nats/token) of the batches' targets' own unigram distribution: the loss to beat.

  Fit on the very tokens it is scored on, so it is a lower bound for any unigram model.
  """
  counts = np.zeros(vocab_size)
  for batch in batches:
    np.add.at(counts, batch['targets'].ravel(), batch['weights'].ravel())
  if jax.process_count() > 1:  # each process counted only its own rows
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    counts = multihost_utils.process_allgather(counts).sum(axis=0)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def pretrained_names(params, model_state) -> dict:
  """{'params/...', 'model_state/COLLECTION/...': leaf} of a pretrained model's variables, named as state.py names
  a TrainState's leaves."""
  tree = {'params': params, 'model_state': model_state}
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


class LanguageModelTask:
  """Next-token prediction on config.data with the model of config.model: what `experiments.train` trains."""
  kind = ''

  def __init__(self, config, workdir: str | None = None):
    self.config, self.workdir = config, workdir
    self.model_config = model_config_from_dict(config.model.to_dict())
    self.model = Transformer(self.model_config, deterministic=self.model_config.dropout == 0)
    self.eval_model = Transformer(self.model_config, deterministic=True)

  @functools.cached_property
  def tokenizer(self):
    """Built on first use: a benchmark never needs one, and bpe:N trains into the workdir."""
    tokenizer = tokenizers.tokenizer_from_config(self.config.data, self.workdir)
    tokenizers.check_vocab(self.model_config.vocab_size, tokenizer)
    return tokenizer

  def loss_fn(self):
    return step_lib.lm_loss_fn(self.model, self.config.z_loss)

  def eval_fn(self):
    return step_lib.make_eval_step(self.eval_model, self.tokenizer.token_bytes())

  def summarize_eval(self, sums) -> dict:
    return step_lib.summarize_eval(jax.tree.map(float, sums))

  def eval_metrics(self, state) -> dict:
    del state
    return {}

  def batches(self, split: str, shuffle: bool):
    c = self.config
    return pipeline.make_batches(c.data, self.tokenizer, split=split, global_batch_size=c.batch_size,
                                 seq_len=c.seq_len, seed=c.seed, shuffle=shuffle, process_index=jax.process_index(),
                                 process_count=jax.process_count())

  def eval_batches(self, n: int) -> list:
    batches = self.batches(self.config.data.eval_split, shuffle=False)
    return [next(batches) for _ in range(n)]

  def next_batch(self, state, batches):
    del state
    return next(batches), {}

  def check_metrics(self, step: int, values: dict) -> None:
    del step, values

  def pretrained_weights(self, abstract_state) -> dict:
    """Every parameter (and the model state collections it has, e.g. router biases) of config.init_from, any
    lmlab.convert.load_model path; a collection it lacks (a router it did not have) starts fresh."""
    from lmlab.convert import load_model  # pylint: disable=g-import-not-at-top  (optional readers inside)
    from lmlab.train.loop import log  # pylint: disable=g-import-not-at-top  (loop builds on this module)
    path = self.config.init_from
    pretrained = load_model(path, verify=self.config.verify_checkpoints, log=log)
    source = pretrained_names(pretrained.params, pretrained.model_state)
    wanted = {'params': abstract_state.params,
              'model_state': {k: v for k, v in abstract_state.model_state.items() if k in pretrained.model_state}}
    mismatch = checkpoint.first_mismatch({k: v.shape for k, v in source.items()}, checkpoint.path_shapes(wanted))
    if mismatch:
      raise ValueError(f'--config.init_from={path} does not fit this model: {mismatch.removeprefix("params/")}; set '
                       '--config.model.* to the pretrained model\'s config')
    ours = model_config_to_dict(self.model_config)
    differ = [k for k, v in model_config_to_dict(pretrained.config).items() if ours.get(k) != v]
    if differ:
      log(f'note: the run\'s model config differs from {path}\'s in {", ".join(differ)} (shapes match)')
    return source

  def baseline_loss(self, validation) -> float:
    return unigram_entropy(validation, self.tokenizer.vocab_size)

  def metadata(self, workdir: str) -> dict:
    del workdir  # a bpe:N tokenizer already lives there, at its recorded source
    return {'tokenizer': self.tokenizer.to_dict()}
