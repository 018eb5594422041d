"""lmlab's own export: params as an Orbax checkpoint beside model.json (model config + tokenizer info).

Layout of DIR: params/ (orbax StandardCheckpointer), model.json, tokenizer.json (when the tokenizer
has one). `load_orbax(DIR)` gives back exactly what `load_pretrained` gave before the export.
"""
import json
import os

from lmlab.convert import mapping
from lmlab.models import ModelConfig, model_config_from_dict, model_config_to_dict

FORMAT = 'lmlab-orbax-v1'


def is_orbax_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, 'model.json')) and \
      os.path.isdir(os.path.join(path, 'params'))


def save_orbax(path: str, config: ModelConfig, params, tokenizer=None, source: str = '') -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  info = None
  if tokenizer is not None:
    info = {**tokenizer.to_dict(), 'add_bos': bool(getattr(tokenizer, 'add_bos', False)),
            'chat_template': getattr(tokenizer, 'chat_template', None)}
    inner = getattr(tokenizer, 'tokenizer', None)
    if inner is not None and hasattr(inner, 'save'):
      inner.save(os.path.join(path, 'tokenizer.json'))
      info['file'] = 'tokenizer.json'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, 'params'), mapping.to_numpy(params), force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(path, 'model.json'), 'w') as f:
    json.dump({'format': FORMAT, 'source': source, 'model': model_config_to_dict(config), 'tokenizer': info}, f,
              indent=2)


def _tokenizer(path: str, info: dict | None):
  from lmlab.data.tokenizers import ByteTokenizer, HFTokenizer  # pylint: disable=g-import-not-at-top
  if not info:
    return None
  if info.get('kind') == 'bytes':
    return ByteTokenizer()
  if info.get('kind') == 'hf' and info.get('file'):
    return HFTokenizer.from_file(os.path.join(path, info['file']), eos_id=info.get('eos_id'),
                                 bos_id=info.get('bos_id'), pad_id=info.get('pad_id'),
                                 chat_template=info.get('chat_template'), add_bos=info.get('add_bos', False))
  raise ValueError(f'tokenizer kind {info.get("kind")!r} in {path}/model.json cannot be rebuilt; known: bytes, hf')


def load_orbax(path: str):
  """(ModelConfig, params, tokenizer) from a directory written by save_orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not is_orbax_dir(path):
    raise ValueError(f'{path} is not an lmlab Orbax export (needs model.json and params/); '
                     'write one with python -m experiments.convert --to=orbax')
  with open(os.path.join(path, 'model.json')) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path}/model.json has format {meta.get("format")!r}; this lmlab reads {FORMAT}')
  config = model_config_from_dict(meta['model'])
  params = ocp.StandardCheckpointer().restore(os.path.join(path, 'params'))
  params = mapping.to_numpy(params)
  return config, params, _tokenizer(path, meta.get('tokenizer'))
