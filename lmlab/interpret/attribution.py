"""Per-token attribution of a scalar target to the input embeddings: gradient x input, integrated gradients
(Riemann midpoints or Gauss-Legendre nodes) and occlusion, all of them in one jitted call (`attribute`).

`attribute` takes f: embeddings [L, D] -> scalar, so it applies to any model; `embedding_objective`
builds f for an lmlab model by patching the `embeddings` site (lmlab.interpret.capture), so positions, token
types and every layer stay exactly the model's. Scores per token are sums over D.
Baselines: the pad token's embedding (the default in experiments.interpret) or zeros; from zeros the path starts
at a zero residual stream, where RMSNorm's x / rms(x) is nearly a step function, so IG needs many more steps there.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.interpret import capture as capture_lib
from lmlab.models import ModelConfig

METHODS = ('grad_x_input', 'integrated_gradients', 'occlusion')
RULES = ('riemann', 'gauss_legendre')
BASELINES = ('zero', 'pad')


def quadrature(steps: int, rule: str):
  """(alphas, weights) on [0, 1] whose weighted sum integrates a smooth function of alpha."""
  if steps < 1:
    raise ValueError(f'ig_steps={steps} must be at least 1')
  if rule == 'riemann':  # midpoint rule: second-order, never evaluates the baseline itself
    return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
  if rule == 'gauss_legendre':
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2
  raise ValueError(f'integration rule {rule!r} is not one of {", ".join(RULES)}')


def attribute(f, x_LD, baseline_LD, methods=METHODS, steps: int = 64, rule: str = 'gauss_legendre') -> dict:
  """{method: per-token scores [L]} for `methods` (and 'ig_completeness_gap' with integrated gradients).

  grad_x_input: grad f(x) * x. integrated_gradients: (x - baseline) * the quadrature of grad f along the straight
  path, with its gap |sum(attributions) - (f(x) - f(baseline))|. occlusion: f(x) - f(x with token l's embedding
  replaced by the baseline's). One compiled call for all of them: x, the baseline and every path point go through
  one vmapped value_and_grad, the occluded inputs through one vmapped f.
  """
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f'attribution methods {unknown or "(none given)"} are not among {", ".join(METHODS)}')
  quadrature(steps, rule)  # a bad steps or rule fails here, in one line, not inside the trace
  return _attribute(f, x_LD, baseline_LD, tuple(m for m in METHODS if m in methods), steps, rule)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _attribute(f, x_LD, baseline_LD, methods, steps, rule):
  out = {}
  delta_LD = x_LD - baseline_LD
  if 'grad_x_input' in methods or 'integrated_gradients' in methods:
    ig = 'integrated_gradients' in methods
    alphas_S, weights_S = (jnp.asarray(a, jnp.float32) for a in quadrature(steps if ig else 1, rule))
    path_SLD = baseline_LD[None] + alphas_S[:, None, None] * delta_LD[None]
    points_NLD = jnp.concatenate([x_LD[None], baseline_LD[None], path_SLD] if ig else [x_LD[None]])
    values_N, grads_NLD = jax.vmap(jax.value_and_grad(f))(points_NLD)
    if 'grad_x_input' in methods:
      out['grad_x_input'] = jnp.sum(grads_NLD[0] * x_LD, axis=-1)
    if ig:
      attributions_L = jnp.sum(delta_LD * jnp.tensordot(weights_S, grads_NLD[2:], axes=1), axis=-1)
      out['integrated_gradients'] = attributions_L
      out['ig_completeness_gap'] = jnp.abs(jnp.sum(attributions_L) - (values_N[0] - values_N[1]))
  if 'occlusion' in methods:
    L = x_LD.shape[0]
    occluded_LLD = jnp.where(jnp.eye(L, dtype=bool)[:, :, None], baseline_LD[None], x_LD[None])
    values_N = jax.vmap(f)(jnp.concatenate([x_LD[None], occluded_LLD]))  # f(x) in the same batch: exact zeros
    out['occlusion'] = values_N[0] - values_N[1:]
  return out


def embedding_objective(config: ModelConfig, variables: dict, tokens_L, score, segment_ids_L=None,
                        token_types_L=None):
  """f(embeddings_LD) = score(captured sites of the model on `tokens_L` with its token embeddings replaced).

  `score` maps the capture ({site name: [1, ...] array}, lmlab.interpret.capture) to a scalar.
  """
  tokens_1L = jnp.asarray(tokens_L, jnp.int32)[None]
  segments_1L = None if segment_ids_L is None else jnp.asarray(segment_ids_L)[None]
  types_1L = None if token_types_L is None else jnp.asarray(token_types_L)[None]

  def f(embeddings_LD):
    patches = {'embeddings': {'mask': jnp.ones(embeddings_LD[None].shape, bool), 'value': embeddings_LD[None]}}
    return score(capture_lib.flatten(config, capture_lib.forward(config, variables, tokens_1L, segments_1L,
                                                                 types_1L, patches)))
  return f


def token_embeddings(config: ModelConfig, params: dict, tokens_L):
  """The model's token embeddings of `tokens_L` in its compute dtype: [L, D]."""
  return jnp.asarray(params['embed']['embedding'])[jnp.asarray(tokens_L)].astype(jnp.dtype(config.compute_dtype))


def baseline(config: ModelConfig, params: dict, tokens_L, kind: str = 'zero', pad_id: int | None = None):
  """The IG / occlusion reference: zero embeddings, or the pad token's embedding at every position."""
  if kind == 'zero':
    return jnp.zeros_like(token_embeddings(config, params, tokens_L))
  if kind == 'pad':
    if pad_id is None:
      raise ValueError('baseline=pad needs a tokenizer with a pad token; use baseline=zero')
    return token_embeddings(config, params, np.full(len(tokens_L), pad_id))
  raise ValueError(f'baseline {kind!r} is not one of {", ".join(BASELINES)}')
