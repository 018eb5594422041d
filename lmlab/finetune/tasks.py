"""Fine-tuning tasks: what lmlab.train's build and loop receive to train something other than pretraining.

A task (the methods lmlab/train/task.py lists) holds the pretrained model (`init_from`, via lmlab.convert) or a
config-built one, its tokenizer, a `FinetuneModel` (transformer + optional classification head + optional LoRA
adapters, behind the init/apply that state.py and step.py already use) and, for classification, its own loss,
eval sums and summary. SFT needs none of those: it is the language-model loss on weighted tokens, so the
language-model task's step and eval apply unchanged. Frozen weights live outside `params`, in the non-trainable
`frozen` collection of the TrainState's model_state: the step differentiates and the optimizer updates (and
keeps Adam moments for) the trainable leaves only.
"""
import abc
import dataclasses
import json

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmlab.data import tokenizers
from lmlab.finetune import chat, data, lora
from lmlab.models import ModelConfig, Transformer, model_config_from_dict
from lmlab.models.heads import ClassificationHead
from lmlab.train import losses, task as task_lib

HEAD_KEYS = ('pooler', 'classifier')
# Taken from config.model even when init_from supplies the architecture: how to run, not what the network is.
RUNTIME_KEYS = ('compute_dtype', 'param_dtype', 'remat', 'attention', 'dropout', 'loss_vocab_chunk')
METHODS = ('lora', 'full')


@dataclasses.dataclass(frozen=True)
class FinetuneModel:
  """Transformer [+ ClassificationHead] [+ LoRA adapters] behind flax's init/apply signatures."""
  config: ModelConfig
  num_classes: int = 0          # > 0: class logits from a head instead of token logits
  pooling: str = 'mean'
  method: str = 'full'          # full | lora
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = 'attn/(query|value)'
  deterministic: bool = True

  def transformer(self) -> Transformer:
    return Transformer(self.config, deterministic=self.deterministic)

  def head(self) -> ClassificationHead:
    return ClassificationHead(self.config, self.num_classes, self.pooling)

  def init(self, rngs, tokens_BL):
    """{'params': the trainable weights, 'frozen': the rest (a non-trainable collection: no gradient, no
    optimizer state)}, both logically partitioned."""
    rng_head, rng_lora = jax.random.split(rngs['params'])
    variables = dict(self.transformer().init(rngs, tokens_BL))
    params = dict(variables['params'])
    if self.num_classes:
      hidden_BLD = jnp.zeros(tokens_BL.shape + (self.config.d_model,), jnp.float32)
      params.update(self.head().init(rng_head, hidden_BLD, tokens_BL >= 0)['params'])
    if self.method == 'lora':
      params['lora'] = lora.init(params, rng_lora, self.lora_rank, self.lora_alpha, self.lora_targets)
    variables['params'], variables['frozen'] = self.split(params)
    return variables

  def is_trainable(self, names: list[str]) -> bool:
    """Everything when full; LoRA's A and B and the head when LoRA."""
    if self.method not in METHODS:
      raise ValueError(f'finetune.method={self.method!r} is not one of {", ".join(METHODS)}')
    adapter = names[0] == 'lora' and names[-1] in ('a', 'b')
    return self.method == 'full' or adapter or names[0] in HEAD_KEYS

  def destinations(self, names: list[str]) -> list[str]:
    """Where a pretrained parameter goes in the TrainState: params when trained, the frozen collection if not."""
    path = '/'.join(names)
    return [f'params/{path}' if self.is_trainable(names) else f'model_state/frozen/{path}']

  def split(self, params) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts of `params`' leaves (boxed leaves stay boxed)."""
    trainable, frozen = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
      names = [str(getattr(k, 'key', k)) for k in path]
      lora.set_path(trainable if self.is_trainable(names) else frozen, names, leaf)
    return trainable, frozen

  def transformer_variables(self, variables) -> dict:
    """The plain Transformer's variables (LoRA merged in, frozen weights joined, no head): what it, the generator
    and every lmlab.convert reader apply."""
    params = lora.merged(lora.merge_trees(variables['params'], variables.get('frozen', {})))
    params = {k: v for k, v in params.items() if k not in HEAD_KEYS}
    return {'params': params, **{k: v for k, v in variables.items() if k not in ('params', 'frozen')}}

  def apply(self, variables, tokens_BL, positions_BL=None, segment_ids_BL=None, rngs=None):
    """(token logits_BLV or class logits_BC, aux), through the merged LoRA weights."""
    head = {k: v for k, v in variables['params'].items() if k in HEAD_KEYS}
    out, aux = self.transformer().apply(self.transformer_variables(variables), tokens_BL, positions_BL,
                                        segment_ids_BL, return_hidden=bool(self.num_classes), rngs=rngs)
    if self.num_classes:
      out = self.head().apply({'params': head}, out, segment_ids_BL > 0)
    return out, aux


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def class_nll_sum(logits_BC, labels_B, weights_B) -> jax.Array:
  """Weighted cross-entropy summed over rows: the token cross-entropy with each row one 'token'."""
  nll_sum, _, _ = losses.token_cross_entropy(logits_BC[:, None], labels_B[:, None], weights_B[:, None])
  return nll_sum


def classification_loss_fn(model: FinetuneModel):
  """(params, model_state, batch, rng) -> (loss sum, nll sum, aux): weighted cross-entropy over rows."""
  def loss_fn(params, model_state, batch, rng):
    logits_BC, aux = model.apply({'params': params, **model_state}, batch['inputs'], batch['positions'],
                                 batch['segment_ids'], rngs={'dropout': rng})
    nll_sum = class_nll_sum(logits_BC, batch['labels'], batch['weights'])
    return nll_sum, nll_sum, aux
  return loss_fn


def classification_eval_fn(model: FinetuneModel):
  """(params, model_state, batch) -> summed loss, example count and confusion matrix [true, predicted]."""
  def eval_fn(params, model_state, batch):
    logits_BC, _ = model.apply({'params': params, **model_state}, batch['inputs'], batch['positions'],
                               batch['segment_ids'])
    true_BC = jax.nn.one_hot(batch['labels'], model.num_classes) * batch['weights'][:, None]
    predicted_BC = jax.nn.one_hot(jnp.argmax(logits_BC, -1), model.num_classes)
    return {'nll_sum': class_nll_sum(logits_BC, batch['labels'], batch['weights']),
            'examples': jnp.sum(batch['weights']),
            'confusion': jnp.einsum('BT,BP->TP', true_BC, predicted_BC)}
  return eval_fn


def classification_metrics(confusion_TP) -> dict:
  """Accuracy and macro-F1 from a confusion matrix (rows true, columns predicted).

  Macro-F1 averages the per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur as a true
  or a predicted label (scikit-learn's default label set), so an absent class does not count as 0.
  """
  confusion_TP = np.asarray(confusion_TP, np.float64)
  tp_C = np.diag(confusion_TP)
  support_C, predicted_C = confusion_TP.sum(1), confusion_TP.sum(0)
  present_C = (support_C + predicted_C) > 0
  f1_C = 2 * tp_C / np.maximum(support_C + predicted_C, 1e-12)
  return {'accuracy': float(tp_C.sum() / max(confusion_TP.sum(), 1e-12)),
          'macro_f1': float(f1_C[present_C].mean()) if present_C.any() else 0.0}


def summarize_classification(sums) -> dict:
  """Eval metrics from summed counts; the confusion matrix is a JSON string (metrics.jsonl stays flat)."""
  metrics = classification_metrics(sums['confusion'])
  examples = float(sums['examples'])
  return {'eval_loss': float(sums['nll_sum']) / max(examples, 1.0), 'eval_accuracy': metrics['accuracy'],
          'eval_macro_f1': metrics['macro_f1'], 'eval_examples': examples,
          'eval_confusion': json.dumps(np.asarray(sums['confusion']).round().astype(int).tolist())}


class Task(task_lib.LanguageModelTask, abc.ABC):
  """Model, tokenizer, pretrained weights and data of one fine-tuning run, built from the config; what it does not
  override (loss, eval, baseline) is the language-model task's."""
  kind = ''
  model_class = FinetuneModel  # a task whose model holds more (DPO's reference weights) subclasses it

  def __init__(self, config):  # pylint: disable=super-init-not-called  (the model comes from init_from, not model.*)
    self.config, self.workdir = config, None
    f = config.finetune
    self.init_from = config.init_from
    if self.init_from:
      from lmlab import convert  # pylint: disable=g-import-not-at-top
      self.pretrained = convert.load_model(self.init_from, verify=config.verify_checkpoints)
      if self.pretrained.tokenizer is None:
        raise ValueError(f'init_from={self.init_from} has no tokenizer; fine-tuning needs one for its text')
      self.tokenizer = self.pretrained.tokenizer
      runtime = {k: config.model[k] for k in RUNTIME_KEYS}
      self.model_config = dataclasses.replace(self.pretrained.config, **runtime)
    else:
      self.pretrained = None
      self.model_config = model_config_from_dict(config.model.to_dict())
      self.tokenizer = tokenizers.tokenizer_from_config(config.data)
    tokenizers.check_vocab(self.model_config.vocab_size, self.tokenizer)
    self.label_names = self.setup_data()
    settings = dict(num_classes=len(self.label_names), pooling=f.pooling, method=f.method, lora_rank=f.lora_rank,
                    lora_alpha=f.lora_alpha, lora_targets=f.lora_targets)
    self.model = self.model_class(self.model_config, deterministic=self.model_config.dropout == 0, **settings)
    self.eval_model = self.model_class(self.model_config, deterministic=True, **settings)

  @abc.abstractmethod
  def setup_data(self) -> list[str]:
    """Builds the task's datasets; returns the label names (empty for SFT)."""

  @abc.abstractmethod
  def batches(self, split: str, shuffle: bool, repeat: bool = True):
    """This process's rows of the split's batches (data.Batches)."""

  def eval_batches(self, n: int) -> list:
    """Up to n batches of one pass over the validation split (never an example twice)."""
    batches = self.batches(self.config.data.eval_split, shuffle=False, repeat=False)
    return [b for _, b in zip(range(n), batches)]

  def pretrained_weights(self, abstract_state) -> dict:
    """init_from's parameters where the model keeps them (trained, frozen, a reference copy) and its model state
    (e.g. a sigmoid_bias MoE's router biases) in its own collections; the head and adapters stay fresh."""
    source = task_lib.pretrained_names({}, self.pretrained.model_state)
    for path, value in jax.tree_util.tree_leaves_with_path(self.pretrained.params):
      names = [str(getattr(k, 'key', k)) for k in path]
      if names[0] == 'pooler' and 'pooler' not in abstract_state.params:
        continue  # a BERT pooler the mean-pooling head does not use
      source.update({name: value for name in self.model.destinations(names)})
    return source

  def metadata(self, workdir: str) -> dict:
    """The tokenizer (saved as WORKDIR/tokenizer.json when it is a Hugging Face one, for generate --workdir; a
    GGUF's lives inside the model file) and the task's settings."""
    info = {**self.tokenizer.to_dict(), 'chat_template': getattr(self.tokenizer, 'chat_template', None),
            'add_bos': bool(getattr(self.tokenizer, 'add_bos', False))}
    inner = getattr(self.tokenizer, 'tokenizer', None)
    if info['kind'] == 'hf' and hasattr(inner, 'save'):
      info['source'] = os.path.join(os.path.abspath(workdir), 'tokenizer.json')
      if jax.process_index() == 0:
        inner.save(info['source'])
    return {'tokenizer': info, 'finetune': self.finetune_metadata()}

  def finetune_metadata(self) -> dict:
    f = self.config.finetune
    return {'task': self.kind, 'init_from': self.init_from, 'method': f.method, 'labels': self.label_names,
            'lora': {'rank': f.lora_rank, 'alpha': f.lora_alpha, 'targets': f.lora_targets} if f.method == 'lora'
                    else None}


class ClassificationTask(Task):
  """Sequence classification: rows [CLS] text [SEP] + padding, one label each."""
  kind = 'classify'

  def setup_data(self) -> list[str]:
    texts, labels, names = data.classification_dataset(self.config, self.config.data.train_split)
    self.train_rows = self._encode(texts, labels)
    texts, labels, _ = data.classification_dataset(self.config, self.config.data.eval_split, names)
    self.eval_rows = self._encode(texts, labels)
    return names

  def _encode(self, texts, labels):
    L = self.config.seq_len
    return [(data.encode_for_classification(self.tokenizer, t, L), y) for t, y in zip(texts, labels)]

  def _row(self, ids, label):
    L, n = self.config.seq_len, len(ids)
    inputs = np.full(L, self.tokenizer.pad_id or 0, np.int32)
    inputs[:n] = ids
    return {'inputs': inputs, 'positions': np.arange(L, dtype=np.int32),
            'segment_ids': (np.arange(L) < n).astype(np.int32), 'labels': np.int32(label),
            'weights': np.float32(1.0 if n else 0.0)}

  def batches(self, split: str, shuffle: bool, repeat: bool = True):
    rows = self.train_rows if split == self.config.data.train_split else self.eval_rows
    return data.Batches(len(rows), lambda i: self._row(*rows[i]), self._row([], 0), self.config.batch_size,
                        self.config.seed, shuffle, repeat)

  def loss_fn(self):
    return classification_loss_fn(self.model)

  def eval_fn(self):
    return classification_eval_fn(self.eval_model)

  def summarize_eval(self, sums) -> dict:
    return summarize_classification(sums)

  def baseline_loss(self, validation) -> float:
    """Entropy of the validation labels: the loss of the best constant guess."""
    del validation
    counts = np.bincount([y for _, y in self.eval_rows], minlength=len(self.label_names))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

  def baseline(self) -> dict:
    """The majority class's share of the validation set: the accuracy to beat."""
    counts = np.bincount([y for _, y in self.eval_rows], minlength=len(self.label_names))
    return {'majority_class': self.label_names[int(counts.argmax())],
            'majority_accuracy': float(counts.max() / max(counts.sum(), 1))}


class SftTask(Task):
  """Supervised fine-tuning of a decoder: one prompt/response pair per row, loss on the response tokens."""
  kind = 'sft'

  def setup_data(self) -> list[str]:
    f = self.config.finetune
    if self.model_config.family != 'decoder':
      raise ValueError(f'finetune.task=sft needs a causal decoder; init_from is an {self.model_config.family}')
    self.rows = {}
    for split in (self.config.data.train_split, self.config.data.eval_split):
      records = data.sft_records(self.config, split)
      self.rows[split] = [chat.sft_example(self.tokenizer, r[f.prompt_key], r[f.response_key]) for r in records]
    return []

  def _row(self, ids, weights):
    """inputs/targets shifted by one; a response token's weight sits on the position that predicts it."""
    L = self.config.seq_len
    ids, weights = ids[:L + 1], weights[:L + 1]
    n = max(len(ids) - 1, 0)
    row = {'inputs': np.full(L, self.tokenizer.pad_id or 0, np.int32), 'targets': np.zeros(L, np.int32),
           'positions': np.arange(L, dtype=np.int32), 'segment_ids': (np.arange(L) < n).astype(np.int32),
           'weights': np.zeros(L, np.float32)}
    row['inputs'][:n], row['targets'][:n], row['weights'][:n] = ids[:-1], ids[1:], weights[1:]
    return row

  def batches(self, split: str, shuffle: bool, repeat: bool = True):
    rows = self.rows[split]
    return data.Batches(len(rows), lambda i: self._row(*rows[i]), self._row([], []), self.config.batch_size,
                        self.config.seed, shuffle, repeat)



TASKS = {'classify': ClassificationTask, 'sft': SftTask}


def make_task(config) -> Task:
  """The task `finetune.task` names, built from the config (its pretrained model loaded, its data read)."""
  from lmlab.finetune import dpo, grpo_task, reward  # pylint: disable=g-import-not-at-top  (they build on this)
  kinds = {**TASKS, **{t.kind: t for t in (dpo.DpoTask, reward.RewardTask, grpo_task.GrpoTask)}}
  if config.finetune.task not in kinds:
    raise ValueError(f'finetune.task={config.finetune.task!r} is not one of {", ".join(kinds)} (or \'\' to pretrain)')
  return kinds[config.finetune.task](config)
