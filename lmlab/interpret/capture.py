"""Named intermediates of one jitted forward pass of the exact lmlab model, by stable name.

| name                          | shape        | what                                                  | patch |
|-------------------------------|--------------|-------------------------------------------------------|-------|
| `embeddings`                  | [B, L, D]    | token embeddings (before positions, types, embed norm) | yes   |
| `layers/i/residual_in`        | [B, L, D]    | residual stream entering block i                      | yes   |
| `layers/i/attention/weights`  | [B, H, L, L] | attention probabilities after masking and softmax     | no    |
| `layers/i/attention/heads`    | [B, L, H, K] | each head's output before the output projection       | yes   |
| `layers/i/attention/output`   | [B, L, D]    | attention output after the projection                 | yes   |
| `layers/i/mlp/output`         | [B, L, D]    | feed-forward output (dense MLP or the whole MoE layer) | yes   |
| `layers/i/moe/router_probs`   | [B, L, N]    | router probabilities over the N router slots          | no    |
| `layers/i/moe/experts`        | [B, L, K]    | the K chosen experts                                  | no    |
| `layers/i/moe/expert_weights` | [B, L, K]    | their gates (zero one to ablate that expert there)    | yes   |
| `layers/i/residual_out`       | [B, L, D]    | residual stream leaving block i (post-norm: normed)   | yes   |
| `final_norm`                  | [B, L, D]    | final norm output (pre-norm models only)              | yes   |
| `logits`                      | [B, L, V]    | the model's logits                                    | yes   |

The model marks these with `lmlab.models.layers.site`: they are sown into the `intermediates` collection (stacked
over layers by the layer scan, like `params`) and replaced where a `patches` collection says so; a plain apply passes
neither and pays nothing. Attention weights exist only on the einsum path, so analysis runs `analysis_config(config)`
(`attention='einsum'`: the same maths as cuDNN / XLA attention, with the probabilities materialised).
"""
import dataclasses
import functools
import re

import jax
import numpy as np

from lmlab.models import ModelConfig, Transformer

TOP_SITES = {'embeddings': 'embeddings', 'final_hidden': 'final_norm', 'logits': 'logits'}
BLOCK_SITES = {('residual_in',): 'residual_in', ('attn', 'attention_weights'): 'attention/weights',
               ('attn', 'heads'): 'attention/heads', ('attention_output',): 'attention/output',
               ('mlp_output',): 'mlp/output', ('moe', 'router_probs'): 'moe/router_probs',
               ('moe', 'experts'): 'moe/experts', ('moe', 'expert_weights'): 'moe/expert_weights',
               ('residual_out',): 'residual_out'}
CAPTURE_ONLY = ('attention/weights', 'moe/router_probs', 'moe/experts')
_LAYER_NAME = re.compile(r'layers/(\d+)/(.+)')


def analysis_config(config: ModelConfig) -> ModelConfig:
  """The same network with attention weights materialised (einsum path) and no rematerialisation."""
  return dataclasses.replace(config, attention='einsum', remat='none')


def site_path(config: ModelConfig, name: str) -> tuple[tuple[str, ...], int | None]:
  """(path in the collections, scan group or None) of a public site name; ValueError for an unknown one."""
  if name in TOP_SITES.values():
    return (next(k for k, v in TOP_SITES.items() if v == name),), None
  match = _LAYER_NAME.fullmatch(name)
  inner = {v: k for k, v in BLOCK_SITES.items()}
  if not match or match.group(2) not in inner or int(match.group(1)) >= config.num_layers:
    raise ValueError(f'unknown site {name!r}; sites are {", ".join(TOP_SITES.values())} and layers/I/'
                     f'{{{",".join(inner)}}} for I < {config.num_layers} (see lmlab/interpret/capture.py)')
  group, block = divmod(int(match.group(1)), config.layers_per_group)
  return ('layers', f'block_{block}') + inner[match.group(2)], group


@functools.partial(jax.jit, static_argnums=0)
def forward(config, variables, tokens_BL, segment_ids_BL, token_types_BL, patches):
  """The raw `intermediates` collection of one forward pass with the `patches` collection (or None) applied."""
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  if patches:
    variables['patches'] = patches
  _, state = Transformer(config).apply(variables, tokens_BL, None, segment_ids_BL, token_types_BL,
                                       mutable=['intermediates'])
  return state['intermediates']


def flatten(config: ModelConfig, intermediates: dict) -> dict:
  """The `intermediates` collection as {public name: array}; the scan's stacked layers become layers/i/..."""
  out = {}
  for key, name in TOP_SITES.items():
    if key in intermediates:
      out[name] = intermediates[key][0]
  for b in range(config.layers_per_group):
    block = intermediates.get('layers', {}).get(f'block_{b}', {})
    for path, name in BLOCK_SITES.items():
      node = block
      for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
      if not isinstance(node, tuple):
        continue
      for g in range(node[0].shape[0]):
        out[f'layers/{g * config.layers_per_group + b}/{name}'] = node[0][g]
  return out


def capture(config: ModelConfig, variables: dict, tokens_BL, segment_ids_BL=None, token_types_BL=None,
            patches=None) -> dict:
  """{site name: array} of one forward pass (jitted once per config and shapes); see the table above.

  `variables` is {'params': ..., **model_state}; `segment_ids_BL` marks padding with 0 (right padding);
  `patches` is a `patches` collection (lmlab.interpret.patch builds one). Run with analysis_config(config) to get
  attention weights.
  """
  tokens_BL = np.asarray(tokens_BL, np.int32)
  if tokens_BL.ndim != 2:
    raise ValueError(f'tokens must be [batch, length], got shape {tokens_BL.shape}')
  return flatten(config, forward(config, variables, tokens_BL, segment_ids_BL, token_types_BL, patches))
