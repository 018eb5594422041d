"""Pretrained weights in and out: Hugging Face directories, GGUF files, lmlab Orbax exports.

`load_pretrained(path) -> (ModelConfig, params, tokenizer)` picks the reader from what `path` is;
params come back as nested dicts of float32 numpy arrays in lmlab's layout.
"""
import os

from lmlab.convert.gguf import load_gguf
from lmlab.convert.hf import PICKLE_SUFFIXES, load_hf, refuse_pickle, save_hf
from lmlab.convert.orbax_io import is_orbax_dir, load_orbax, save_orbax


def load_pretrained(path: str):
  """A Hugging Face directory, a .gguf file (or a directory holding one), or an lmlab Orbax export."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise ValueError(f'--pretrained={path} does not exist')
  if os.path.isfile(path):
    if path.endswith('.gguf'):
      return load_gguf(path)
    if path.endswith(PICKLE_SUFFIXES):
      refuse_pickle(path)
    if os.path.basename(path) == 'config.json':
      return load_hf(os.path.dirname(path) or '.')
    raise ValueError(f'{path} is neither a .gguf file nor a directory; pass a Hugging Face directory, a .gguf file '
                     'or an lmlab Orbax export')
  if is_orbax_dir(path):
    return load_orbax(path)
  if os.path.exists(os.path.join(path, 'config.json')):
    return load_hf(path)
  ggufs = sorted(f for f in os.listdir(path) if f.endswith('.gguf'))
  if len(ggufs) == 1:
    return load_gguf(os.path.join(path, ggufs[0]))
  found = sorted(os.listdir(path))[:8]
  if any(f.endswith(PICKLE_SUFFIXES) for f in found):
    refuse_pickle(os.path.join(path, next(f for f in found if f.endswith(PICKLE_SUFFIXES))))
  raise ValueError(f'{path} has no config.json, model.json or single .gguf file (found {found})')


def save(path: str, to: str, config, params, tokenizer=None, source: str = '') -> None:
  """Writes `params` as a Hugging Face directory (to='hf') or an lmlab Orbax export (to='orbax')."""
  if to == 'hf':
    save_hf(path, config, params, tokenizer)
  elif to == 'orbax':
    save_orbax(path, config, params, tokenizer, source)
  else:
    raise ValueError(f'--to={to!r} is not one of hf, orbax')


__all__ = ['load_pretrained', 'load_hf', 'load_gguf', 'load_orbax', 'save', 'save_hf', 'save_orbax']
