"""One loader for every tool: `load_model(path) -> Pretrained`, whatever `path` holds.

A Hugging Face directory, a .gguf file (or a directory holding one), an lmlab Orbax export, or a training
or fine-tuning run's workdir (a directory with `checkpoints/`): its latest intact checkpoint, or
`WORKDIR@best` (the kept step with the lowest eval loss) or `WORKDIR@STEP`. From a workdir only the weights
are read (params, frozen weights and model state; not the optimizer state), damaged checkpoints are skipped
as training skips them, and each array is checked against its digest.
"""
import dataclasses
import os
import sys
from typing import Any, Callable

from lmlab.convert.gguf import load_gguf
from lmlab.convert.hf import PICKLE_SUFFIXES, load_hf, refuse_pickle
from lmlab.convert.orbax_io import is_orbax_dir, read_orbax
from lmlab.models import ModelConfig, model_config_from_dict


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A model ready to apply: `Transformer(config).apply(variables, tokens_BL)`."""
  config: ModelConfig
  params: dict             # LoRA merged, frozen weights included
  model_state: dict        # non-trainable collections the model applies with, e.g. {'router_state': ...}; {} mostly
  tokenizer: Any           # None when the source has none
  source: str              # what was loaded, for reports: 'runs/main step 400'
  metadata: dict = dataclasses.field(default_factory=dict)  # a workdir checkpoint's metadata (fine-tuning task, ...)
  step: int | None = None  # a workdir's checkpoint step

  @property
  def variables(self) -> dict:
    return {'params': self.params, **self.model_state}


def _stderr(message: str) -> None:
  """The default `log`: stderr, once per job (every process of a multi-process job loads alike)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def load_model(path: str, verify: bool = True, log: Callable[[str], None] = _stderr) -> Pretrained:
  """The model at `path` (see the module docstring); `log` gets the lines about skipped or unverified checkpoints."""
  path = os.path.expanduser(path)
  workdir, at, which = path.rpartition('@')
  if at and not os.path.exists(path):
    return load_workdir(workdir, which, verify, log)
  if not os.path.exists(path):
    raise ValueError(f'--pretrained={path} does not exist')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return load_workdir(path, '', verify, log)
  if os.path.isfile(path):
    if path.endswith('.gguf'):
      return _weights(path, *load_gguf(path))
    if path.endswith(PICKLE_SUFFIXES):
      refuse_pickle(path)
    if os.path.basename(path) == 'config.json':
      return _weights(path, *load_hf(os.path.dirname(path) or '.'))
    raise ValueError(f'{path} is neither a .gguf file nor a directory; pass a Hugging Face directory, a .gguf file, '
                     'an lmlab Orbax export or a run\'s workdir')
  if is_orbax_dir(path):
    config, params, model_state, tokenizer = read_orbax(path)
    return Pretrained(config, params, model_state, tokenizer, path)
  if os.path.exists(os.path.join(path, 'config.json')):
    return _weights(path, *load_hf(path))
  ggufs = sorted(f for f in os.listdir(path) if f.endswith('.gguf'))
  if len(ggufs) == 1:
    return _weights(path, *load_gguf(os.path.join(path, ggufs[0])))
  found = sorted(os.listdir(path))[:8]
  if any(f.endswith(PICKLE_SUFFIXES) for f in found):
    refuse_pickle(os.path.join(path, next(f for f in found if f.endswith(PICKLE_SUFFIXES))))
  raise ValueError(f'{path} has no config.json, model.json, checkpoints/ or single .gguf file (found {found})')


def _weights(path: str, config: ModelConfig, params: dict, tokenizer) -> Pretrained:
  return Pretrained(config, params, {}, tokenizer, path)


def load_workdir(workdir: str, which: str = '', verify: bool = True, log: Callable[[str], None] = _stderr):
  """A run's checkpoint as a Pretrained: `which` is '' (the latest intact one), 'best' or a step number."""
  from lmlab.data.tokenizers import tokenizer_from_dict  # pylint: disable=g-import-not-at-top
  from lmlab.finetune import lora  # pylint: disable=g-import-not-at-top
  from lmlab.train import checkpoint  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'{workdir}@{which}: {workdir} is not a run\'s workdir (it has no checkpoints/)')
  checkpointer = checkpoint.Checkpointer(directory, writable=False)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise ValueError(f'no checkpoints in {directory}; train first, or pass another model')
    if which == 'best':
      steps = [checkpointer.best_step()]
    elif which:
      if not which.isdigit() or int(which) not in steps:
        raise ValueError(f'{workdir}@{which}: use @best or @STEP with one of the steps {", ".join(map(str, steps))}')
      steps = [int(which)]
    step, weights, _ = checkpoint.restore_first_intact(checkpointer, steps, checkpoint.only('params', 'model_state'),
                                                       log, fall_back=not which, verify=verify)
    metadata = checkpointer.item(step, 'metadata')
  finally:
    checkpointer.close()
  model_state = dict(weights['model_state'])
  # Fine-tuning keeps frozen weights in the 'frozen' collection and LoRA adapters beside them: fold both in. A
  # preference run's frozen copy of its initial weights ('reference') is training state, not part of the model.
  model_state.pop('reference', None)
  params = lora.merged(lora.merge_trees(weights['params'], model_state.pop('frozen', {})))
  return Pretrained(model_config_from_dict(metadata['model']), params, model_state,
                    tokenizer_from_dict(metadata.get('tokenizer'), workdir), f'{workdir} step {step}', metadata, step)


def weights_only(model: Pretrained) -> tuple[ModelConfig, dict, Any]:
  """(config, params, tokenizer) for callers that apply params alone; a model with model state is refused."""
  if model.model_state:
    raise ValueError(f'{model.source} applies with model state ({", ".join(sorted(model.model_state))}) that '
                     '(config, params, tokenizer) would drop; use lmlab.convert.load_model and its .variables')
  return model.config, model.params, model.tokenizer
