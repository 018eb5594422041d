"""One table per family maps Hugging Face tensor names to lmlab parameter paths, both directions.

Hugging Face linear weights are [out, in]; lmlab kernels are [in..., out...] in their true shape
(query [D, H, K], attention out [H, K, D]), stacked over the scanned layer axis. GGUF files are read
into Hugging Face names first (gguf.py), so every format shares these tables.
"""
import dataclasses
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
  H, G, K, D = c.num_heads, c.num_kv_heads, c.dims_per_head, c.d_model
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


def layer_entries(c: ModelConfig, block: int) -> tuple[str, list[Entry]]:
  """(HF name prefix with `{i}` for the layer index, entries) of block `block` in each scanned group.

  A MoE block's experts are not single tensors in HF files; moe_from_hf / moe_to_hf handle them.
  """
  if c.family == 'encoder':
    return 'encoder.layer.{i}.', _encoder_layer(c)
  if is_moe_block(c, block):
    return 'model.layers.{i}.', _decoder_layer(c)
  return 'model.layers.{i}.', _decoder_layer(c) + _dense_mlp(c)


def is_moe_block(c: ModelConfig, block: int) -> bool:
  return c.is_moe and block == c.layers_per_group - 1


def moe_from_hf(c: ModelConfig, prefix: str, get, has) -> dict:
  """lmlab `moe` params of one layer from Mixtral tensors: per-expert w1/w3/w2 files or transformers-5 fused ones."""
  E = c.moe.num_experts
  if has(prefix + 'block_sparse_moe.gate.weight'):
    p = prefix + 'block_sparse_moe.'
    router_ED = get(p + 'gate.weight')
    gate_EFD = np.stack([get(f'{p}experts.{j}.w1.weight') for j in range(E)])
    up_EFD = np.stack([get(f'{p}experts.{j}.w3.weight') for j in range(E)])
    down_EDF = np.stack([get(f'{p}experts.{j}.w2.weight') for j in range(E)])
  else:  # transformers >= 5 in-memory layout: gate and up concatenated along the ffn axis
    p = prefix + 'mlp.'
    router_ED = get(p + 'gate.weight')
    gate_EFD, up_EFD = np.split(get(p + 'experts.gate_up_proj'), 2, axis=1)
    down_EDF = get(p + 'experts.down_proj')
  if router_ED.shape[0] != E:
    raise ValueError(f'{p}gate.weight routes to {router_ED.shape[0]} experts; config.json says {E}')
  t = lambda w: np.ascontiguousarray(np.swapaxes(w, -1, -2), dtype=np.float32)
  return {'router': t(router_ED), 'wi_gate': t(gate_EFD), 'wi_up': t(up_EFD), 'wo': t(down_EDF)}


def moe_to_hf(c: ModelConfig, prefix: str, moe: dict) -> dict:
  """Mixtral per-expert tensors (the layout on the Hub, which transformers 5 fuses on load)."""
  m = c.moe
  if m.shared_experts or m.zero_experts or m.router != 'softmax':
    raise ValueError('only Mixtral-shaped MoE (softmax router, no shared or zero experts) exports to Hugging Face')
  t = lambda w: np.ascontiguousarray(np.swapaxes(np.asarray(w, np.float32), -1, -2))
  p = prefix + 'block_sparse_moe.'
  out = {p + 'gate.weight': t(moe['router'])}
  for j in range(m.num_experts):
    out[f'{p}experts.{j}.w1.weight'] = t(moe['wi_gate'][j])
    out[f'{p}experts.{j}.w3.weight'] = t(moe['wi_up'][j])
    out[f'{p}experts.{j}.w2.weight'] = t(moe['wo'][j])
  return out


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



def params_from_hf(c: ModelConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> dict:
  """lmlab params (nested dict of float32 numpy) from a tensor getter keyed by HF names."""
  params = {}
  for entry in top_entries(c):
    set_path(params, entry.path, entry.to_lmlab(get(entry.hf)))
  if c.family == 'encoder' and all(has(e.hf) for e in pooler_entries(c)):
    for entry in pooler_entries(c):
      set_path(params, entry.path, entry.to_lmlab(get(entry.hf)))
  groups = c.num_layers // c.layers_per_group
  for block in range(c.layers_per_group):
    prefix, entries = layer_entries(c, block)
    for entry in entries:
      stacked = [entry.to_lmlab(get(prefix.format(i=layer_index(c, g, block)) + entry.hf)) for g in range(groups)]
      set_path(params, ('layers', f'block_{block}') + entry.path, np.stack(stacked))
    if is_moe_block(c, block):
      moes = [moe_from_hf(c, prefix.format(i=layer_index(c, g, block)), get, has) for g in range(groups)]
      params['layers'][f'block_{block}']['moe'] = {k: np.stack([m[k] for m in moes]) for k in moes[0]}
  return params


def params_to_hf(c: ModelConfig, params: dict) -> dict[str, np.ndarray]:
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
    prefix, entries = layer_entries(c, block)
    for entry in entries:
      stacked = get_path(params, ('layers', f'block_{block}') + entry.path)
      for g in range(groups):
        out[prefix.format(i=layer_index(c, g, block)) + entry.hf] = entry.to_hf(stacked[g])
    if is_moe_block(c, block):
      moe = params['layers'][f'block_{block}']['moe']
      for g in range(groups):
        out.update(moe_to_hf(c, prefix.format(i=layer_index(c, g, block)), {k: v[g] for k, v in moe.items()}))
  return out


def to_numpy(tree):
  """Nested dict (of jax or numpy arrays, possibly boxed) -> nested dict of float32 numpy arrays."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: to_numpy(v) for k, v in tree.items()}
  value = getattr(tree, 'value', tree)  # flax Partitioned boxes
  return np.asarray(value, np.float32)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a/b/c': array} view of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}/'))
    else:
      out[prefix + key] = value
  return out
