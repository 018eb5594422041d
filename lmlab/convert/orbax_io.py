"""lmlab's own export: params (and model state) as Orbax checkpoints beside model.json (model config + tokenizer info).

Layout of DIR: params/ (orbax StandardCheckpointer), model_state/ (the same, only for a model that applies
with non-trainable collections, e.g. a sigmoid_bias MoE's router_state), model.json, tokenizer.json (when the
tokenizer has one). `read_orbax(DIR)` gives back exactly what was exported.
"""
import json
import os

from lmlab.convert import mapping
from lmlab.models import ModelConfig, model_config_from_dict, model_config_to_dict

FORMAT = 'lmlab-orbax-v1'


def is_orbax_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, 'model.json')) and \
      os.path.isdir(os.path.join(path, 'params'))


def save_orbax(path: str, config: ModelConfig, params, tokenizer=None, source: str = '', model_state=None) -> None:
  """Every process of a multi-process job calls this (Orbax's saves are collectives); process 0 writes the JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  info, primary = None, jax.process_index() == 0
  if tokenizer is not None:
    info = {**tokenizer.to_dict(), 'add_bos': bool(getattr(tokenizer, 'add_bos', False)),
            'chat_template': getattr(tokenizer, 'chat_template', None)}
    inner = getattr(tokenizer, 'tokenizer', None)
    if inner is not None and hasattr(inner, 'save'):
      if primary:
        inner.save(os.path.join(path, 'tokenizer.json'))
      info['file'] = 'tokenizer.json'
  checkpointer = ocp.StandardCheckpointer()
  for name, tree in (('params', params), ('model_state', model_state)):
    if tree:
      checkpointer.save(os.path.join(path, name), mapping.to_numpy(tree), force=True)
  checkpointer.wait_until_finished()
  if primary:
    with open(os.path.join(path, 'model.json'), 'w') as f:
      json.dump({'format': FORMAT, 'source': source, 'model': model_config_to_dict(config), 'tokenizer': info}, f,
                indent=2)


def read_orbax(path: str):
  """(ModelConfig, params, model_state, tokenizer) from a directory written by save_orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from lmlab.data.tokenizers import tokenizer_from_dict  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not is_orbax_dir(path):
    raise ValueError(f'{path} is not an lmlab Orbax export (needs model.json and params/); '
                     'write one with python -m experiments.convert --to=orbax')
  with open(os.path.join(path, 'model.json')) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path}/model.json has format {meta.get("format")!r}; this lmlab reads {FORMAT}')
  trees = {name: mapping.to_numpy(ocp.StandardCheckpointer().restore(os.path.join(path, name)))
           for name in ('params', 'model_state') if os.path.isdir(os.path.join(path, name))}
  return (model_config_from_dict(meta['model']), trees['params'], trees.get('model_state', {}),
          tokenizer_from_dict(meta.get('tokenizer'), path))
