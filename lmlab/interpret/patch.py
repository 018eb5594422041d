"""Interventions on named sites: replace or ablate any patchable intermediate and rerun; activation patching.

A patch is `{site name: (mask, value)}`: the site becomes `where(mask, value, activation)`, so a patched
position carries exactly `value` (no difference is added, nothing is recomputed), and the rest is untouched.
Values come from a capture of another input (activation patching), zeros or a mean (ablation).
"""
import jax
import jax.numpy as jnp
import numpy as np

from lmlab.interpret import capture as capture_lib
from lmlab.models import ModelConfig

ABLATIONS = ('zero', 'mean')


def patch_tree(config: ModelConfig, patches: dict) -> dict:
  """The model's `patches` collection for {name: (mask, value)}; per-layer sites are stacked over the scan."""
  tree, stacked = {}, {}
  for name, (mask, value) in patches.items():
    path, group = capture_lib.site_path(config, name)
    if name.endswith(capture_lib.CAPTURE_ONLY):
      raise ValueError(f'site {name!r} can be captured but not patched (see lmlab/interpret/capture.py)')
    value = jnp.asarray(value)
    entry = {'mask': jnp.broadcast_to(jnp.asarray(mask, bool), value.shape), 'value': value}
    if group is None:
      _set(tree, path, entry)
    else:
      stacked.setdefault(path, {})[group] = entry
  num_groups = config.num_layers // config.layers_per_group
  for path, groups in stacked.items():
    # The scan needs every layer's slice: layers without a patch get an all-False mask.
    like = next(iter(groups.values()))
    off = {'mask': jnp.zeros_like(like['mask']), 'value': jnp.zeros_like(like['value'])}
    entries = [groups.get(g, off) for g in range(num_groups)]
    _set(tree, path, jax.tree.map(lambda *xs: jnp.stack(xs), *entries))
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def run_patched(config: ModelConfig, variables: dict, tokens_BL, patches: dict, segment_ids_BL=None,
                token_types_BL=None) -> dict:
  """capture() of a run with `patches` ({name: (mask, value)}) applied."""
  return capture_lib.capture(config, variables, tokens_BL, segment_ids_BL, token_types_BL,
                             patch_tree(config, patches))


def ablation(captured: dict, name: str, mode: str = 'zero', mask=True) -> tuple:
  """(mask, value) replacing site `name` by zeros or by its mean over batch and positions, where `mask` holds."""
  if mode not in ABLATIONS:
    raise ValueError(f'ablation mode {mode!r} is not one of {", ".join(ABLATIONS)}')
  x = jnp.asarray(captured[name])
  if mode == 'zero':
    return mask, jnp.zeros_like(x)
  return mask, jnp.broadcast_to(jnp.mean(x, axis=(0, 1), keepdims=True), x.shape)  # every site is [B, L, ...]


def head_ablation(captured: dict, layer: int, head: int, mode: str = 'zero') -> dict:
  """A patch removing one attention head (its output before the projection) at every position."""
  name = f'layers/{layer}/attention/heads'
  H = captured[name].shape[2]
  if not 0 <= head < H:
    raise ValueError(f'head {head} is out of range: layer {layer} has {H} heads')
  return {name: ablation(captured, name, mode, (np.arange(H) == head)[None, None, :, None])}


def expert_ablation(captured: dict, layer: int, expert: int) -> dict:
  """A patch zeroing expert `expert`'s gate in MoE layer `layer` wherever the router chose it."""
  name = f'layers/{layer}/moe/experts'
  if name not in captured:
    raise ValueError(f'layer {layer} is not a MoE layer (no {name} captured)')
  return {f'layers/{layer}/moe/expert_weights': (captured[name] == expert, jnp.zeros(captured[name].shape))}


def activation_patching(config: ModelConfig, variables: dict, clean_tokens_BL, corrupt_tokens_BL, metric,
                        site: str = 'residual_in', segment_ids_BL=None, batch_size: int = 16):
  """metric(captured) of the corrupted run with the clean `layers/i/{site}` patched in at one (layer, position).

  `metric` maps a capture ({site name: array}, lmlab.interpret.capture) to a scalar, e.g. a target's log-probability.

  Returns (scores [layers, L], clean metric, corrupted metric); all layers x positions runs are one jitted
  `lax.map` (batches of `batch_size` runs). The two inputs must have the same shape (token-aligned).
  """
  clean_tokens_BL, corrupt_tokens_BL = np.asarray(clean_tokens_BL), np.asarray(corrupt_tokens_BL)
  if clean_tokens_BL.shape != corrupt_tokens_BL.shape:
    raise ValueError(f'clean {clean_tokens_BL.shape} and corrupted {corrupt_tokens_BL.shape} inputs must have the '
                     'same shape; pad or pick texts with the same number of tokens')
  clean = capture_lib.capture(config, variables, clean_tokens_BL, segment_ids_BL)
  corrupt = capture_lib.capture(config, variables, corrupt_tokens_BL, segment_ids_BL)
  n, L = config.num_layers, clean_tokens_BL.shape[1]
  names = [f'layers/{i}/{site}' for i in range(n)]

  @jax.jit
  def scores(variables, clean_values):
    def one(index):
      layer, position = index // L, index % L
      at_BL1 = (jnp.arange(L) == position)[None, :, None]
      patches = {name: ((i == layer) & at_BL1, value) for i, (name, value) in enumerate(zip(names, clean_values))}
      tree = patch_tree(config, patches)
      return metric(capture_lib.flatten(config, capture_lib.forward(config, variables, corrupt_tokens_BL,
                                                                    segment_ids_BL, None, tree)))
    return jax.lax.map(one, jnp.arange(n * L), batch_size=batch_size).reshape(n, L)

  return np.asarray(scores(variables, [clean[name] for name in names])), float(metric(clean)), float(metric(corrupt))
