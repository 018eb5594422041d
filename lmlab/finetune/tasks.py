"""Fine-tuning tasks: what build.py needs to train something other than next-token prediction from scratch.

A task holds the pretrained model (`init_from`, via lmlab.convert) or a config-built one, its tokenizer,
a `FinetuneModel` (transformer + optional classification head + optional LoRA adapters, behind the
init/apply that state.py and step.py already use) and, for classification, its own loss, eval sums and
summary. SFT needs none of those: it is the language-model loss on weighted tokens, so the standard
step and eval apply unchanged. Frozen weights live outside `params`, in the non-trainable `frozen`
collection of the TrainState's model_state: the step differentiates and the optimizer updates (and
keeps Adam moments for) the trainable leaves only.
"""
import abc
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmlab.data import tokenizers
from lmlab.finetune import chat, data, lora
from lmlab.models import ModelConfig, Transformer, model_config_from_dict
from lmlab.models.heads import ClassificationHead

HEAD_KEYS = ('pooler', 'classifier')
# Taken from config.model even when init_from supplies the architecture: how to run, not what the network is.
RUNTIME_KEYS = ('compute_dtype', 'param_dtype', 'remat', 'attention', 'dropout')
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

  def split(self, params) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts of `params`' leaves (boxed leaves stay boxed)."""
    trainable, frozen = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
      names = [str(getattr(k, 'key', k)) for k in path]
      lora.set_path(trainable if self.is_trainable(names) else frozen, names, leaf)
    return trainable, frozen

  def apply(self, variables, tokens_BL, positions_BL=None, segment_ids_BL=None, rngs=None):
    """(token logits_BLV or class logits_BC, aux), through the merged LoRA weights."""
    params = lora.merged(lora.merge_trees(variables['params'], variables.get('frozen', {})))
    head = {k: params.pop(k) for k in HEAD_KEYS if k in params}
    model_state = {k: v for k, v in variables.items() if k not in ('params', 'frozen')}
    out, aux = self.transformer().apply({'params': params, **model_state}, tokens_BL, positions_BL, segment_ids_BL,
                                        return_hidden=bool(self.num_classes), rngs=rngs)
    if self.num_classes:
      out = self.head().apply({'params': head}, out, segment_ids_BL > 0)
    return out, aux


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def classification_loss_fn(model: FinetuneModel):
  """(params, model_state, batch, rng) -> (loss sum, nll sum, aux): weighted cross-entropy over rows."""
  def loss_fn(params, model_state, batch, rng):
    logits_BC, aux = model.apply({'params': params, **model_state}, batch['inputs'], batch['positions'],
                                 batch['segment_ids'], rngs={'dropout': rng})
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch['labels'])
    nll_sum = jnp.sum(nll_B * batch['weights'])
    return nll_sum, nll_sum, aux
  return loss_fn


def classification_eval_fn(model: FinetuneModel):
  """(params, model_state, batch) -> summed loss, example count and confusion matrix [true, predicted]."""
  def eval_fn(params, model_state, batch):
    logits_BC, _ = model.apply({'params': params, **model_state}, batch['inputs'], batch['positions'],
                               batch['segment_ids'])
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch['labels'])
    true_BC = jax.nn.one_hot(batch['labels'], model.num_classes) * batch['weights'][:, None]
    predicted_BC = jax.nn.one_hot(jnp.argmax(logits_BC, -1), model.num_classes)
    return {'nll_sum': jnp.sum(nll_B * batch['weights']), 'examples': jnp.sum(batch['weights']),
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


class Task(abc.ABC):
  """Model, tokenizer, pretrained params and data of one fine-tuning run, built from the config."""
  kind = ''
  model_class = FinetuneModel  # a task whose model holds more (DPO's reference weights) subclasses it

  def __init__(self, config):
    self.config = config
    f = config.finetune
    self.init_from = config.init_from
    if self.init_from:
      from lmlab import convert  # pylint: disable=g-import-not-at-top
      pretrained = convert.load_model(self.init_from, verify=config.verify_checkpoints)
      if pretrained.model_state:  # load_pretrained below places params and frozen weights only
        raise ValueError(f'init_from={self.init_from} applies with model state ({", ".join(pretrained.model_state)}, '
                         'e.g. MoE router biases) that fine-tuning cannot place yet; fine-tune a model without it')
      model_config, self.pretrained, self.tokenizer = pretrained.config, pretrained.params, pretrained.tokenizer
      if self.tokenizer is None:
        raise ValueError(f'init_from={self.init_from} has no tokenizer; fine-tuning needs one for its text')
      runtime = {k: config.model[k] for k in RUNTIME_KEYS}
      self.model_config = dataclasses.replace(model_config, **runtime)
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

  def load_pretrained(self, state, shardings):
    """state with every pretrained tensor put in place, sharded, in params or the frozen collection."""
    if self.pretrained is None:
      return state
    trees = {'params': (state.params, shardings.params),
             'frozen': (state.model_state.get('frozen', {}), shardings.model_state.get('frozen', {}))}
    where = {}
    for collection, (values, targets) in trees.items():
      for path, value in jax.tree_util.tree_flatten_with_path(values)[0]:
        where[jax.tree_util.keystr(path)] = (collection, path, value)
    targets = {c: dict(jax.tree_util.tree_flatten_with_path(t[1])[0]) for c, t in trees.items()}
    loaded = {c: {} for c in trees}
    for path, value in jax.tree_util.tree_flatten_with_path(self.pretrained)[0]:
      name = jax.tree_util.keystr(path)
      if name not in where:
        if name.startswith("['pooler']"):
          continue  # a BERT pooler the mean-pooling head does not use
        raise ValueError(f'init_from tensor {name} has no place in the model; the checkpoint and config disagree')
      collection, model_path, current = where[name]
      if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f'init_from tensor {name} has shape {value.shape}, the model {current.shape}')
      host = np.asarray(value, current.dtype)  # each process fills only its own shards
      loaded[collection][model_path] = jax.make_array_from_callback(host.shape, targets[collection][model_path],
                                                                    lambda index, host=host: host[index])
    replace = lambda tree, new: jax.tree.unflatten(jax.tree.structure(tree), [
        new.get(p, v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]])
    model_state = dict(state.model_state)
    if 'frozen' in model_state:
      model_state['frozen'] = replace(model_state['frozen'], loaded['frozen'])
    return state.replace(params=replace(state.params, loaded['params']), model_state=model_state)

  def metadata(self) -> dict:
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

  def loss_fn(self):
    return None  # the language-model loss of step.py

  def eval_fn(self):
    return None

  def summarize_eval(self, sums) -> dict:
    from lmlab.train import step  # pylint: disable=g-import-not-at-top
    return step.summarize_eval(sums)


TASKS = {'classify': ClassificationTask, 'sft': SftTask}


def make_task(config) -> Task:
  from lmlab.finetune import dpo, reward  # pylint: disable=g-import-not-at-top  (they build on this module)
  kinds = {**TASKS, dpo.DpoTask.kind: dpo.DpoTask, reward.RewardTask.kind: reward.RewardTask}
  if config.finetune.task not in kinds:
    raise ValueError(f'finetune.task={config.finetune.task!r} is not one of {", ".join(kinds)} (or \'\' to pretrain)')
  return kinds[config.finetune.task](config)
