"""Per-token attribution of a scalar target to the input embeddings: gradient x input, integrated gradients
(Riemann midpoints or Gauss-Legendre nodes) and occlusion, all of them in one jitted call.

`attribute` takes f: embeddings [L, D] -> scalar, so it applies to any model (compiled once per f).
`attribute_inputs` explains a padded batch of inputs of an lmlab model in one compiled call whose ids, positions and
targets are arguments, so every batch of the same shape reuses it; it patches the `embeddings` site
(lmlab.interpret.capture), so positions, token types and every layer stay exactly the model's. Scores per token are
sums over D.
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
  return _attribute(f, x_LD, baseline_LD, _checked(methods, steps, rule), steps, rule)


def _checked(methods, steps: int, rule: str) -> tuple[str, ...]:
  """The methods in canonical order; a bad method, steps or rule fails here, in one line, not inside a trace."""
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f'attribution methods {unknown or "(none given)"} are not among {", ".join(METHODS)}')
  quadrature(steps, rule)
  return tuple(m for m in METHODS if m in methods)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _attribute(f, x_LD, baseline_LD, methods, steps, rule):
  return _methods(f, x_LD, baseline_LD, methods, steps, rule)


def _methods(f, x_LD, baseline_LD, methods, steps, rule) -> dict:
  """The traced body of `attribute` (see there) for one input."""
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


def _forward_passes(methods, steps: int, length: int) -> int:
  """Forward passes (of `length` tokens) `_methods` costs one input: x, the baseline, IG's path, the occlusions."""
  ig = 'integrated_gradients' in methods
  grads = steps + 2 if ig else 1 if 'grad_x_input' in methods else 0
  return grads + (length + 1 if 'occlusion' in methods else 0)


# The forward passes vmapped together hold at most this many tokens: a memory bound, as every token of a pass keeps
# its activations for the backward pass. One input always goes, however long.
TOKENS_PER_ROUND = 2048


def attribute_inputs(config: ModelConfig, variables: dict, objective, head_params: dict, tokens_BL, real_BL,
                     positions_B, targets_B, x_BLD, baseline_BLD, methods=METHODS, steps: int = 64,
                     rule: str = 'gauss_legendre', inputs_per_round: int | None = None, progress: bool = False) -> dict:
  """`attribute` for a batch of right-padded inputs of an lmlab model: {method: [B, L]} (and the IG gaps [B]).

  Input b's f is objective(head_params, capture of tokens_BL[b] with its embeddings replaced, real_BL[b],
  positions_B[b], targets_B[b]); `objective` is hashable (lmlab.interpret.objective.Objective), `real_BL` is 1 on
  real tokens and 0 on padding (the segment ids, so no real token sees padding). Everything but the settings is an
  argument of one jitted call: a second batch of the same shape compiles nothing. The inputs go in rounds of
  `inputs_per_round` (default: as many as TOKENS_PER_ROUND allows) through a lax.map, vmapped within a round and IG's
  path points vmapped within each input; `progress` prints a line as each round ends. Scores on padding are
  meaningless: slice them off.
  """
  methods = _checked(methods, steps, rule)
  B, L = np.shape(tokens_BL)
  if inputs_per_round is None:
    inputs_per_round = TOKENS_PER_ROUND // (_forward_passes(methods, steps, L) * L)
  rounds = -(-B // min(B, max(1, inputs_per_round)))
  per_round = -(-B // rounds)  # as even as the rounds allow, so the last one pads the fewest inputs
  inputs = (jnp.asarray(tokens_BL, jnp.int32), jnp.asarray(real_BL, jnp.int32), jnp.asarray(positions_B, jnp.int32),
            jnp.asarray(targets_B, jnp.int32), x_BLD, baseline_BLD)
  return _attribute_inputs(config, objective, methods, steps, rule, per_round, progress, variables, head_params,
                           inputs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _attribute_inputs(config, objective, methods, steps, rule, per_round, progress, variables, head_params, inputs):
  B = inputs[0].shape[0]
  n = -(-B // per_round)

  def one(tokens_L, real_L, position, target, x_LD, base_LD):
    def f(embeddings_LD):
      captured = embedding_capture(config, variables, tokens_L[None], embeddings_LD, real_L[None])
      return objective(head_params, captured, real_L[None], position[None], target[None])[0]
    return _methods(f, x_LD, base_LD, methods, steps, rule)

  def round_(args):
    i, batch = args
    out = jax.vmap(one)(*batch)
    if progress:  # handed a result, so it prints once the round is done
      jax.debug.callback(functools.partial(_print_progress, per_round=per_round, total=B), i,
                         next(iter(out.values())))
    return out

  if n == 1:  # no loop to compile
    return round_((0, inputs))
  # The last round is filled up with copies of the last input, dropped afterwards.
  fill = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], n * per_round - B, 0)]).reshape(n, per_round, *a.shape[1:])
  out = jax.lax.map(round_, (jnp.arange(n), jax.tree.map(fill, inputs)))
  return jax.tree.map(lambda a: a.reshape(n * per_round, *a.shape[2:])[:B], out)


def _print_progress(i, _, *, per_round: int, total: int) -> None:
  first = int(i) * per_round
  print(f'attribution: inputs {first + 1}-{min(first + per_round, total)} of {total} done', flush=True)


def embedding_capture(config: ModelConfig, variables: dict, tokens_1L, embeddings_LD, segment_ids_1L=None,
                      token_types_1L=None) -> dict:
  """capture() of one input with its token embeddings replaced by `embeddings_LD` (traceable, differentiable)."""
  patches = {'embeddings': {'mask': jnp.ones(embeddings_LD[None].shape, bool), 'value': embeddings_LD[None]}}
  return capture_lib.flatten(config, capture_lib.forward(config, variables, tokens_1L, segment_ids_1L,
                                                         token_types_1L, patches))


def embedding_objective(config: ModelConfig, variables: dict, tokens_L, score, segment_ids_L=None,
                        token_types_L=None):
  """f(embeddings_LD) = score(captured sites of the model on `tokens_L` with its token embeddings replaced).

  `score` maps the capture ({site name: [1, ...] array}, lmlab.interpret.capture) to a scalar. f closes over the
  ids, so `attribute` compiles once per input: explain many inputs with `attribute_inputs`.
  """
  tokens_1L = jnp.asarray(tokens_L, jnp.int32)[None]
  segments_1L = None if segment_ids_L is None else jnp.asarray(segment_ids_L)[None]
  types_1L = None if token_types_L is None else jnp.asarray(token_types_L)[None]
  return lambda embeddings_LD: score(embedding_capture(config, variables, tokens_1L, embeddings_LD, segments_1L,
                                                       types_1L))


def token_embeddings(config: ModelConfig, params: dict, tokens):
  """The model's token embeddings of `tokens` ([L] or [B, L]) in its compute dtype: [..., D]."""
  return jnp.asarray(params['embed']['embedding'])[jnp.asarray(tokens)].astype(jnp.dtype(config.compute_dtype))


def baseline(config: ModelConfig, params: dict, tokens, kind: str = 'zero', pad_id: int | None = None):
  """The IG / occlusion reference for `tokens` ([L] or [B, L]): zero embeddings, or the pad token's everywhere."""
  if kind == 'zero':
    return jnp.zeros_like(token_embeddings(config, params, tokens))
  if kind == 'pad':
    if pad_id is None:
      raise ValueError('baseline=pad needs a tokenizer with a pad token; use baseline=zero')
    return token_embeddings(config, params, np.full(np.shape(tokens), pad_id))
  raise ValueError(f'baseline {kind!r} is not one of {", ".join(BASELINES)}')
