"""LoRA: low-rank adapters W + (alpha / r) * A @ B on the kernels whose path matches a pattern.

Adapters live beside the model's params, in `params['lora']`, at the path of the kernel they adapt
(e.g. lora/layers/block_0/attn/query/{a, b}), with the constant scale alpha/r stored as
`params['lora']['scale']` so a checkpoint merges without its config. A scanned kernel
[layers, in..., out...] gets A [layers, in..., r] and B [layers, r, out...]; B starts at zero, so the
adapted model starts as the pretrained one. The forward pass uses the merged weights (`merged`), so
what is trained is exactly what is exported.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Dense kernels contract one input axis, except attention's output projection ([heads, head_dim, embed]).
TWO_INPUT_AXES = ('heads', 'head_dim')


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _split(names: tuple) -> tuple[int, int]:
  """(leading stacked axes, input axes) of a kernel from its logical axis names."""
  lead = sum(1 for n in names if n == 'layers')
  rest = names[lead:]
  return lead, 2 if tuple(rest[:2]) == TWO_INPUT_AXES else 1


def targets(params, pattern: str) -> list[str]:
  """Paths (without '/kernel') of the kernels whose path `re.search`es `pattern`."""
  found = []
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for path, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
    name = _path(path)
    if name.endswith('/kernel') and re.search(pattern, name[:-len('/kernel')]):
      found.append(name[:-len('/kernel')])
  return found


def init(boxed_params, rng, rank: int, alpha: float, pattern: str) -> dict:
  """Adapters for every matching kernel of `boxed_params` (logically partitioned), boxed the same way."""
  paths = targets(boxed_params, pattern)
  if not paths:
    raise ValueError(f'finetune.lora_targets={pattern!r} matches no kernel; kernels are named like '
                     "'layers/block_0/attn/query' (try 'attn/(query|value)')")
  adapters = {'scale': jnp.asarray(alpha / rank, jnp.float32)}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = _get(boxed_params, path.split('/') + ['kernel'])
    lead, n_in = _split(kernel.names)
    shape, names = kernel.value.shape, tuple(kernel.names)
    fan_in = int(np.prod(shape[lead:lead + n_in]))
    a = jax.random.normal(key, shape[:lead + n_in] + (rank,), kernel.value.dtype) / np.sqrt(fan_in)
    b = jnp.zeros(shape[:lead] + (rank,) + shape[lead + n_in:], kernel.value.dtype)
    node = {'a': nn.LogicallyPartitioned(a, names[:lead + n_in] + (None,)),
            'b': nn.LogicallyPartitioned(b, names[:lead] + (None,) + names[lead + n_in:])}
    set_path(adapters, path.split('/'), node)
  return adapters


def delta(a, b, kernel_ndim: int):
  """A @ B over the rank axis, batched over the leading stacked axes, in the kernel's shape."""
  lead = a.ndim + b.ndim - 2 - kernel_ndim
  n_in, n_out = a.ndim - 1 - lead, b.ndim - 1 - lead
  letters = 'abcdefgh'
  L, I, O = letters[:lead], letters[lead:lead + n_in], letters[lead + n_in:lead + n_in + n_out]
  return jnp.einsum(f'{L}{I}r,{L}r{O}->{L}{I}{O}', a, b, precision=jax.lax.Precision.HIGHEST)


def merged(params: dict) -> dict:
  """params without 'lora', each adapted kernel replaced by W + scale * A @ B; params unchanged if no adapters."""
  if 'lora' not in params:
    return params
  adapters = dict(params['lora'])
  scale = adapters.pop('scale')
  out = {k: v for k, v in params.items() if k != 'lora'}
  for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    names = _path(path).split('/')
    if names[-1] != 'a':
      continue
    node = _get(adapters, names[:-1])
    kernel = _get(out, names[:-1] + ['kernel'])
    update = scale * delta(node['a'], node['b'], kernel.ndim)
    set_path(out, names[:-1] + ['kernel'], kernel + update.astype(kernel.dtype))
  return out


def merge_trees(a: dict, b: dict) -> dict:
  """Nested dicts with disjoint leaves as one (trainable params + the frozen collection)."""
  out = dict(a)
  for key, value in b.items():
    out[key] = merge_trees(out[key], value) if isinstance(value, dict) and key in out else value
  return out


def _get(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def set_path(tree, names, value):
  """Sets tree[n0][n1]...= value, copying the dicts on the way (inputs are never mutated)."""
  for name in names[:-1]:
    tree[name] = dict(tree.get(name, {}))
    tree = tree[name]
  tree[names[-1]] = value
