"""Fine-tuning examples and their batches: labelled texts for classification, prompt/response pairs for SFT.

Datasets (`finetune.dataset`):
  stdlib         classification: docstrings of the running interpreter's standard library, labelled by
                 top-level package (STDLIB_CLASSES); SFT: "What does the function X do?" -> the first
                 paragraph of X's docstring. Split by a hash of the definition's path, like data.source=stdlib.
  files:GLOB     .jsonl records; classification reads data.text_key and finetune.label_key, SFT reads
                 finetune.prompt_key and finetune.response_key. '{split}' in GLOB picks files per split,
                 otherwise records split by a hash of (file, line).
  tfds:NAME      classification only: data.text_key and finetune.label_key of a TFDS split (array_record).
Batches are dicts of numpy arrays with a leading batch axis holding this process's rows of the global batch,
as `pipeline.to_global` expects (multi-host: every process walks the same global order and builds only its own
rows); padding rows and tokens carry weight 0.
"""
import ast
import functools
import glob
import os

import jax
import numpy as np

from lmlab.data import sources

# Learnable groups: each has 170+ docstrings with a vocabulary of its own (GUI widgets, event loops,
# MIME messages, log handlers, DOM/SAX, test assertions).
STDLIB_CLASSES = ('asyncio', 'email', 'logging', 'tkinter', 'unittest', 'xml')
STDLIB_MAX_PER_CLASS = 300   # tkinter alone has 736; capped so the majority class is ~20%, not 37%


@functools.lru_cache(maxsize=1)
def stdlib_definitions() -> tuple[tuple[str, str, str], ...]:
  """(path:qualname, top-level package, docstring) for every documented function and class of the stdlib."""
  root, found = sources.stdlib_root(), []
  for rel in sources.stdlib_paths():
    try:
      tree = ast.parse(open(os.path.join(root, rel), 'rb').read())
    except (SyntaxError, ValueError):
      continue
    found.extend(_definitions(tree, rel, rel.split('/')[0].removesuffix('.py'), ''))
  return tuple(found)


def _definitions(node, rel, group, prefix):
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      name = f'{prefix}{child.name}'
      doc = ast.get_docstring(child)
      if doc and len(doc) > 20:
        yield f'{rel}:{name}', group, doc
      yield from _definitions(child, rel, group, f'{name}.')


def _split_of(key: str, split: str, validation_fraction: float) -> bool:
  return sources.split_of(key, validation_fraction) == split


def stdlib_classification(split: str, validation_fraction: float) -> tuple[list[str], list[int], list[str]]:
  """(texts, labels, label names) of the offline docstring task; each class capped at STDLIB_MAX_PER_CLASS."""
  by_class = {g: [] for g in STDLIB_CLASSES}
  for key, group, doc in stdlib_definitions():
    if group in by_class:
      by_class[group].append((sources.path_fraction(key + '#order'), key, doc))
  texts, labels, seen = [], [], set()
  for label, group in enumerate(STDLIB_CLASSES):
    # A hash order, not the file order; a docstring repeated verbatim (overloads, subclasses) is kept once,
    # so no text sits in both splits.
    unique = [(key, doc) for _, key, doc in sorted(by_class[group]) if not (doc in seen or seen.add(doc))]
    for key, doc in unique[:STDLIB_MAX_PER_CLASS]:
      if _split_of(key, split, validation_fraction):
        texts.append(doc)
        labels.append(label)
  return texts, labels, list(STDLIB_CLASSES)


SFT_MAX_RESPONSE_CHARS = 200  # one- or two-sentence summaries; longer first paragraphs are left out


def stdlib_sft_records(split: str, validation_fraction: float) -> list[dict]:
  """Prompt/response pairs about public stdlib functions: the question names it, the answer is its summary."""
  records = []
  for key, _, doc in stdlib_definitions():
    rel, qualname = key.split(':')
    module = rel.removesuffix('.py').removesuffix('/__init__').replace('/', '.')
    summary = ' '.join(doc.split('\n\n')[0].split())
    public = not any(part.startswith('_') for part in module.split('.') + qualname.split('.'))
    if public and len(summary) <= SFT_MAX_RESPONSE_CHARS and _split_of(key, split, validation_fraction):
      records.append({'prompt': f'What does the Python function {module}.{qualname} do?', 'response': summary})
  return records


def jsonl_records(pattern: str, split: str, validation_fraction: float, with_location: bool = False) -> list:
  """Records of .jsonl files for one split ('{split}' in the glob, or a hash of file and line); with_location:
  (record, 'path:line') pairs, so a bad record can be named."""
  by_split = '{split}' in pattern
  paths = sorted(glob.glob(pattern.replace('{split}', split), recursive=True))
  if not paths:
    raise ValueError(f'finetune.dataset files:{pattern} matched no files for split {split!r}; check the glob')
  records = []
  for path in paths:
    keep = lambda number, path=path: by_split or _split_of(f'{os.path.basename(path)}:{number}', split,
                                                            validation_fraction)
    for number, record in sources.jsonl_rows(path, keep):
      records.append((record, f'{path}:{number}') if with_location else record)
  return records


def _field(record, key: str, where: str):
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f'{where}: a record has no field {key!r}; set the finetune/data key naming it')
  value = record[key]
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else value


def classification_examples(config, split: str) -> tuple[list[str], list, str]:
  """(texts, raw labels, source name) of `finetune.dataset` for one split."""
  spec, text_key, label_key = config.finetune.dataset, config.data.text_key, config.finetune.label_key
  if spec.startswith('files:'):
    records = jsonl_records(spec[len('files:'):], split, config.data.validation_fraction)
  elif spec.startswith('tfds:'):
    data = sources.TfdsSource(spec[len('tfds:'):], split, config.data).data
    records = [data[i] for i in range(len(data))]
  else:
    raise ValueError(f'finetune.dataset={spec!r} for classification: use stdlib, files:GLOB or tfds:NAME')
  return ([str(_field(r, text_key, spec)) for r in records], [_field(r, label_key, spec) for r in records], spec)


def classification_dataset(config, split: str, label_names: list[str] | None = None):
  """(texts, label ids, label names); names come from the train split (sorted distinct values) unless given."""
  if config.finetune.dataset == 'stdlib':
    return stdlib_classification(split, config.data.validation_fraction)
  texts, raw, spec = classification_examples(config, split)
  if label_names is None:
    label_names = sorted({str(v) for v in raw}, key=lambda v: (len(v), v) if v.lstrip('-').isdigit() else (0, v))
  index = {name: i for i, name in enumerate(label_names)}
  unknown = sorted({str(v) for v in raw} - set(index))
  if unknown:
    raise ValueError(f'{spec} split {split!r} has labels {unknown[:5]} not in the train split; relabel or resplit')
  return texts, [index[str(v)] for v in raw], label_names


ARITHMETIC_MAX = 19  # operands 0..19 with + and -: 800 problems a small model can learn to verify in minutes


def arithmetic_records(split: str, validation_fraction: float) -> list[dict]:
  """Every 'What is a + b?' / 'What is a - b?' (a, b in 0..ARITHMETIC_MAX) with its value as both 'response' (SFT)
  and 'answer' (GRPO's rewards), split by a hash of the question."""
  records = []
  for a in range(ARITHMETIC_MAX + 1):
    for b in range(ARITHMETIC_MAX + 1):
      for op, value in (('+', a + b), ('-', a - b)):
        prompt = f'What is {a} {op} {b}?'
        if _split_of(prompt, split, validation_fraction):
          records.append({'prompt': prompt, 'response': str(value), 'answer': str(value)})
  return records


def sft_records(config, split: str) -> list[dict]:
  spec = config.finetune.dataset
  if spec == 'stdlib':
    return stdlib_sft_records(split, config.data.validation_fraction)
  if spec == 'arithmetic':
    return arithmetic_records(split, config.data.validation_fraction)
  if spec.startswith('files:'):
    return jsonl_records(spec[len('files:'):], split, config.data.validation_fraction)
  raise ValueError(f'finetune.dataset={spec!r} for sft: use stdlib, arithmetic or files:GLOB (jsonl with '
                   'prompt/response)')


def encode_for_classification(tokenizer, text: str, seq_len: int) -> list[int]:
  """Ids with the tokenizer's own specials ([CLS] ... [SEP] for BERT), cut to seq_len keeping the last one."""
  inner = getattr(tokenizer, 'tokenizer', None)
  ids = inner.encode(text).ids if inner is not None and hasattr(inner, 'encode') else tokenizer.encode(text)
  return ids if len(ids) <= seq_len else ids[:seq_len - 1] + ids[-1:]


class Batches:
  """This process's rows of fixed-shape global batches; shuffled per epoch from the seed, resumable from (epoch, index).

  Every process walks the same global order and keeps its own slice of each batch, as lmlab.data.pipeline does
  (`pipeline.to_global` expects only this process's rows). `make_row(i)` gives row i's arrays (without the batch
  axis); `blank` is a padding row (weight 0).
  """

  def __init__(self, num_rows: int, make_row, blank: dict, batch_size: int, seed: int, shuffle: bool,
               repeat: bool = True, process_index: int | None = None, process_count: int | None = None):
    if num_rows == 0:
      raise ValueError('the fine-tuning split has no examples; check finetune.dataset and the split keys')
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} is not divisible by the {process_count} processes; '
                       f'use a multiple of {process_count}')
    self.num_rows, self.make_row, self.blank = num_rows, make_row, blank
    self.batch_size, self.seed, self.shuffle, self.repeat = batch_size, seed, shuffle, repeat
    self.local_batch_size = batch_size // process_count
    self.first = process_index * self.local_batch_size
    self.epoch, self.index = 0, 0

  def __iter__(self):
    return self

  def _order(self) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_rows)
    return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.repeat and self.index >= self.num_rows:
      raise StopIteration
    picked, order = [], self._order()  # the global batch's row ids; None pads a finite split's last batch
    while len(picked) < self.batch_size:
      if self.index >= self.num_rows:
        if not self.repeat:
          picked.append(None)
          continue
        self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
      picked.append(int(order[self.index]))
      self.index += 1
    mine = picked[self.first:self.first + self.local_batch_size]
    rows = [self.blank if i is None else self.make_row(i) for i in mine]
    return {k: np.stack([r[k] for r in rows]) for k in self.blank}

  def get_state(self) -> dict:
    return {'epoch': self.epoch, 'index': self.index}

  def set_state(self, state: dict) -> None:
    self.epoch, self.index = int(state['epoch']), int(state['index'])
