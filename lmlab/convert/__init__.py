"""Pretrained weights in and out: Hugging Face directories, GGUF files, lmlab Orbax exports, runs' workdirs.

`load_model(path) -> Pretrained` (config, params, model_state, tokenizer, ...) picks the reader from what
`path` is (lmlab/convert/model.py); params come back as nested dicts of arrays in lmlab's layout.
`load_pretrained(path) -> (ModelConfig, params, tokenizer)` is the same for models without model state.
"""
from lmlab.convert.gguf import load_gguf
from lmlab.convert.hf import load_hf, save_hf
from lmlab.convert.model import Pretrained, load_model, weights_only
from lmlab.convert.orbax_io import read_orbax, save_orbax


def load_pretrained(path: str):
  """(ModelConfig, params, tokenizer) of any path load_model reads; a model with model state is refused."""
  return weights_only(load_model(path))


def load_orbax(path: str):
  """(ModelConfig, params, tokenizer) of an lmlab Orbax export; one with model state is refused (see load_model)."""
  config, params, model_state, tokenizer = read_orbax(path)
  return weights_only(Pretrained(config, params, model_state, tokenizer, path))


def save(path: str, to: str, config, params, tokenizer=None, source: str = '', model_state=None) -> None:
  """Writes `params` as a Hugging Face directory (to='hf') or an lmlab Orbax export (to='orbax', with model_state)."""
  if to == 'hf':
    save_hf(path, config, params, tokenizer)
  elif to == 'orbax':
    save_orbax(path, config, params, tokenizer, source, model_state)
  else:
    raise ValueError(f'--to={to!r} is not one of hf, orbax')


def export(path: str, to: str, out: str, verify: bool = True) -> Pretrained:
  """The model at `path` (anything load_model reads) written to `out` as `to`; what experiments.convert runs."""
  model = load_model(path, verify)
  save(out, to, model.config, model.params, model.tokenizer, source=model.source, model_state=model.model_state)
  return model


__all__ = ['Pretrained', 'export', 'load_model', 'load_pretrained', 'load_hf', 'load_gguf', 'load_orbax', 'save',
           'save_hf', 'save_orbax']
