"""One table per family maps Hugging Face tensor names to lmlab parameter paths, both directions.

Hugging Face linear weights are [out, in]; lmlab kernels are [in..., out...] in their true shape
(query [D, H, K], attention out [H, K, D]), stacked over the scanned layer axis. GGUF files are read
into Hugging Face names first (gguf.py), so every format shares these tables.
"""
import dataclasses
import re
from typing import Callable

import numpy as np

from lmlab.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: lmlab path (inside a block for layer entries), HF name, lmlab shape, kernel input rank."""
  path: tuple[str, ...]
  hf: str
  shape: tuple[int, ...]
  n_in: int = 0                    # > 0: an HF [out, in] weight that becomes a kernel with n_in input axes

  def to_lmlab(self, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    out = w.T if self.n_in else w
    if out.size != int(np.prod(self.shape)):
      raise ValueError(f'tensor {self.hf} has shape {list(w.shape)}, expected {self.size_hint()} for this config')
    return np.ascontiguousarray(out.reshape(self.shape))

  def to_hf(self, p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float32)
    if not self.n_in:
      return p.reshape(-1) if self.path[-1] in ('bias', 'scale') else p  # [H, K] biases are flat in HF
    n_in = int(np.prod(self.shape[:self.n_in]))
    return np.ascontiguousarray(p.reshape(n_in, -1).T)

  def size_hint(self) -> list[int]:
    if not self.n_in:
      return list(self.shape)
    return [int(np.prod(self.shape[self.n_in:])), int(np.prod(self.shape[:self.n_in]))]


def _decoder_layer(c: ModelConfig) -> list[Entry]:
  H, G, K, D, F = c.num_heads, c.num_kv_heads, c.dims_per_head, c.d_model, c.ffn_dim
  e = [Entry(('attn_norm', 'scale'), 'input_layernorm.weight', (D,)),
       Entry(('mlp_norm', 'scale'), 'post_attention_layernorm.weight', (D,))]
  for name, hf, heads in (('query', 'q_proj', H), ('key', 'k_proj', G), ('value', 'v_proj', G)):
    e.append(Entry(('attn', name, 'kernel'), f'self_attn.{hf}.weight', (D, heads, K), 1))
    if c.attention_bias:
      e.append(Entry(('attn', name, 'bias'), f'self_attn.{hf}.bias', (heads, K)))
  e.append(Entry(('attn', 'out', 'kernel'), 'self_attn.o_proj.weight', (H, K, D), 2))
  if c.out_bias:
    e.append(Entry(('attn', 'out', 'bias'), 'self_attn.o_proj.bias', (D,)))
  return e


def _dense_mlp(c: ModelConfig) -> list[Entry]:
  D, F = c.d_model, c.ffn_dim
  e = []
  for name, hf, shape in (('gate', 'gate_proj', (D, F)), ('up', 'up_proj', (D, F)), ('down', 'down_proj', (F, D))):
    e.append(Entry(('mlp', name, 'kernel'), f'mlp.{hf}.weight', shape, 1))
    if c.out_bias:
      e.append(Entry(('mlp', name, 'bias'), f'mlp.{hf}.bias', shape[1:]))
  return e


def _encoder_layer(c: ModelConfig) -> list[Entry]:
  H, K, D, F = c.num_heads, c.dims_per_head, c.d_model, c.ffn_dim
  e = []
  for name in ('query', 'key', 'value'):
    e += [Entry(('attn', name, 'kernel'), f'attention.self.{name}.weight', (D, H, K), 1),
          Entry(('attn', name, 'bias'), f'attention.self.{name}.bias', (H, K))]
  return e + [
      Entry(('attn', 'out', 'kernel'), 'attention.output.dense.weight', (H, K, D), 2),
      Entry(('attn', 'out', 'bias'), 'attention.output.dense.bias', (D,)),
      Entry(('attn_norm', 'scale'), 'attention.output.LayerNorm.weight', (D,)),
      Entry(('attn_norm', 'bias'), 'attention.output.LayerNorm.bias', (D,)),
      Entry(('mlp', 'up', 'kernel'), 'intermediate.dense.weight', (D, F), 1),
      Entry(('mlp', 'up', 'bias'), 'intermediate.dense.bias', (F,)),
      Entry(('mlp', 'down', 'kernel'), 'output.dense.weight', (F, D), 1),
      Entry(('mlp', 'down', 'bias'), 'output.dense.bias', (D,)),
      Entry(('mlp_norm', 'scale'), 'output.LayerNorm.weight', (D,)),
      Entry(('mlp_norm', 'bias'), 'output.LayerNorm.bias', (D,))]


def top_entries(c: ModelConfig) -> list[Entry]:
  """Embeddings, final norm and head (outside the scanned stack)."""
  V, D = c.vocab_size, c.d_model
  if c.family == 'encoder':
    e = [Entry(('embed', 'embedding'), 'embeddings.word_embeddings.weight', (V, D)),
         Entry(('pos_embed', 'embedding'), 'embeddings.position_embeddings.weight', (c.max_len, D)),
         Entry(('embed_norm', 'scale'), 'embeddings.LayerNorm.weight', (D,)),
         Entry(('embed_norm', 'bias'), 'embeddings.LayerNorm.bias', (D,))]
    if c.type_vocab_size:
      e.append(Entry(('type_embed', 'embedding'), 'embeddings.token_type_embeddings.weight', (c.type_vocab_size, D)))
    return e
  e = [Entry(('embed', 'embedding'), 'model.embed_tokens.weight', (V, D)),
       Entry(('final_norm', 'scale'), 'model.norm.weight', (D,))]
  if not c.tie_embeddings:
    e.append(Entry(('lm_head', 'kernel'), 'lm_head.weight', (D, V), 1))
  return e


def pooler_entries(c: ModelConfig) -> list[Entry]:
  """BERT's pooler (dense + tanh on the first token), kept beside the model's params for heads."""
  D = c.d_model
  return [Entry(('pooler', 'kernel'), 'pooler.dense.weight', (D, D), 1),
          Entry(('pooler', 'bias'), 'pooler.dense.bias', (D,))]


def layer_entries(c: ModelConfig, block: int, moe_entries: Callable | None = None) -> tuple[str, list[Entry]]:
  """(HF name prefix with `{i}` for the layer index, entries) of block `block` in each scanned group."""
  if c.family == 'encoder':
    return 'encoder.layer.{i}.', _encoder_layer(c)
  use_moe = c.is_moe and block == c.layers_per_group - 1
  if use_moe:
    if moe_entries is None:
      raise ValueError('this model has MoE layers but no MoE weight mapping was given')
    return 'model.layers.{i}.', _decoder_layer(c) + moe_entries(c)
  return 'model.layers.{i}.', _decoder_layer(c) + _dense_mlp(c)


def layer_index(c: ModelConfig, group: int, block: int) -> int:
  """HF layer number of block `block` in scanned group `group`."""
  return group * c.layers_per_group + block


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def has_path(tree: dict, path: tuple[str, ...]) -> bool:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


LAYER_RE = re.compile(r'\.(\d+)\.')


def params_from_hf(c: ModelConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
                   moe_entries: Callable | None = None) -> dict:
  """lmlab params (nested dict of float32 numpy) from a tensor getter keyed by HF names."""
  params = {}
  for entry in top_entries(c):
    set_path(params, entry.path, entry.to_lmlab(get(entry.hf)))
  if c.family == 'encoder' and all(has(e.hf) for e in pooler_entries(c)):
    for entry in pooler_entries(c):
      set_path(params, entry.path, entry.to_lmlab(get(entry.hf)))
  groups = c.num_layers // c.layers_per_group
  for block in range(c.layers_per_group):
    prefix, entries = layer_entries(c, block, moe_entries)
    for entry in entries:
      stacked = [entry.to_lmlab(get(prefix.format(i=layer_index(c, g, block)) + entry.hf)) for g in range(groups)]
      set_path(params, ('layers', f'block_{block}') + entry.path, np.stack(stacked))
  return params


def params_to_hf(c: ModelConfig, params: dict, moe_entries: Callable | None = None) -> dict[str, np.ndarray]:
  """HF-named float32 tensors from lmlab params (the inverse of params_from_hf)."""
  params = to_numpy(params)
  out = {}
  for entry in top_entries(c):
    out[entry.hf] = entry.to_hf(get_path(params, entry.path))
  if c.family == 'encoder' and has_path(params, ('pooler', 'kernel')):
    for entry in pooler_entries(c):
      out[entry.hf] = entry.to_hf(get_path(params, entry.path))
  groups = c.num_layers // c.layers_per_group
  for block in range(c.layers_per_group):
    prefix, entries = layer_entries(c, block, moe_entries)
    for entry in entries:
      stacked = get_path(params, ('layers', f'block_{block}') + entry.path)
      for g in range(groups):
        out[prefix.format(i=layer_index(c, g, block)) + entry.hf] = entry.to_hf(stacked[g])
  return out


def to_numpy(tree):
  """Nested dict (of jax or numpy arrays, possibly boxed) -> nested dict of float32 numpy arrays."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: to_numpy(v) for k, v in tree.items()}
  value = getattr(tree, 'value', tree)  # flax Partitioned boxes
  return np.asarray(value, np.float32)
