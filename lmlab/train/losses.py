"""Token losses as small pure functions; the train step adds whichever a config enables.

Every token loss is a sum over three per-token numbers of the float32 logits: logsumexp, the target's logit and the
argmax (`logit_stats`). `chunked_logit_stats` gets the same three from the final hidden states and the unembedding a
vocabulary chunk at a time, so training never holds [B, L, V] float32 logits (model.loss_vocab_chunk).
"""
import functools

import jax
import jax.numpy as jnp

from lmlab.models.layers import constrain


def logit_stats(logits_BLV, targets_BL):
  """(logsumexp, target logit, argmax) per token of materialised logits, in float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BLV, axis=-1), target_logit_BL, jnp.argmax(logits_BLV, axis=-1)


def token_sums(stats, targets_BL, weights_BL):
  """Summed masked cross-entropy plus what eval needs, from logit_stats: (nll_sum, logsumexp^2 sum, correct_sum)."""
  lse_BL, target_logit_BL, argmax_BL = stats
  nll_sum = jnp.sum((lse_BL - target_logit_BL) * weights_BL)
  z_sum = jnp.sum(jnp.square(lse_BL) * weights_BL)
  correct_sum = jnp.sum((argmax_BL == targets_BL) * weights_BL)
  return nll_sum, z_sum, correct_sum


def token_cross_entropy(logits_BLV, targets_BL, weights_BL):
  """token_sums of materialised logits: (nll_sum, logsumexp^2 sum, correct_sum)."""
  return token_sums(logit_stats(logits_BLV, targets_BL), targets_BL, weights_BL)


def _chunks(w_DV, chunk: int):
  """The unembedding as n chunks w_nDC; chunk i holds vocabulary ids c * n + i (c < chunk), zero columns past V.

  Strided rather than contiguous: a vocabulary sharded in contiguous blocks (over `tensor`) then gives every chunk an
  equal share on each device, so this reshape moves no data between devices and every chunk uses all of them.
  """
  D, V = w_DV.shape
  n = -(-V // chunk)
  w_DV = jnp.pad(w_DV, ((0, 0), (0, n * chunk - V)))
  return jnp.transpose(w_DV.reshape(D, chunk, n), (2, 0, 1))


def _chunk_logits(x_BLD, w_DC, ids_C, V: int):
  """One chunk's float32 logits, multiplied in x's (compute) dtype as the model's head does; padding is -inf."""
  logits_BLC = jnp.einsum('BLD,DC->BLC', x_BLD, w_DC.astype(x_BLD.dtype)).astype(jnp.float32)
  logits_BLC = constrain(logits_BLC, ('act_batch', 'act_length', 'act_vocab'))
  return jnp.where(ids_C[None, None, :] < V, logits_BLC, -jnp.inf)


def _per_token(x):
  return constrain(x, ('act_batch', 'act_length'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_logit_stats(x_BLD, w_DV, targets_BL, chunk: int):
  """logit_stats of the logits x_BLD @ w_DV, holding only [B, L, chunk] of them at a time.

  x_BLD is the input of the LM head (after the final norm) and w_DV its weight ([D, V]: the tied embedding
  transposed or lm_head's kernel, in its sharding). The model applies no softcapping or logit scaling; one that
  does must apply it here too. The backward pass recomputes each chunk's logits instead of keeping them.
  """
  return _chunked_fwd(x_BLD, w_DV, targets_BL, chunk)[0]


def _chunked_fwd(x_BLD, w_DV, targets_BL, chunk):
  V = w_DV.shape[1]
  w_nDC = _chunks(w_DV, chunk)
  n = w_nDC.shape[0]

  def step(carry, w_and_i):
    max_BL, sum_BL, target_BL, argmax_BL = carry
    w_DC, i = w_and_i
    ids_C = jnp.arange(chunk, dtype=jnp.int32) * n + i
    logits_BLC = _chunk_logits(x_BLD, w_DC, ids_C, V)
    chunk_max_BL = jnp.max(logits_BLC, axis=-1)
    # Strided ids grow along the chunk, so its first maximum is its smallest tied id; a chunk takes over the running
    # argmax on a tie only with a smaller id: the first index over the whole vocabulary, as jnp.argmax gives.
    chunk_argmax_BL = jnp.argmax(logits_BLC, axis=-1).astype(jnp.int32) * n + i
    wins_BL = (chunk_max_BL > max_BL) | ((chunk_max_BL == max_BL) & (chunk_argmax_BL < argmax_BL))
    new_max_BL = jnp.maximum(max_BL, chunk_max_BL)
    sum_BL = sum_BL * jnp.exp(max_BL - new_max_BL) + jnp.sum(jnp.exp(logits_BLC - new_max_BL[..., None]), axis=-1)
    target_BL += jnp.sum(jnp.where(ids_C[None, None, :] == targets_BL[..., None], logits_BLC, 0.0), axis=-1)
    carry = (new_max_BL, sum_BL, target_BL, jnp.where(wins_BL, chunk_argmax_BL, argmax_BL))
    return tuple(_per_token(c) for c in carry), None

  shape = targets_BL.shape
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(shape, jnp.int32))
  (max_BL, sum_BL, target_BL, argmax_BL), _ = jax.lax.scan(
      step, tuple(_per_token(c) for c in init), (w_nDC, jnp.arange(n, dtype=jnp.int32)))
  lse_BL = max_BL + jnp.log(sum_BL)
  return (lse_BL, target_BL, argmax_BL), (x_BLD, w_DV, targets_BL, lse_BL)


def _chunked_bwd(chunk, residuals, cotangents):
  x_BLD, w_DV, targets_BL, lse_BL = residuals
  g_lse_BL, g_target_BL, _ = cotangents  # the argmax has no gradient
  D, V = w_DV.shape
  w_nDC = _chunks(w_DV, chunk)
  n = w_nDC.shape[0]

  def step(dx_BLD, w_and_i):
    w_DC, i = w_and_i
    ids_C = jnp.arange(chunk, dtype=jnp.int32) * n + i
    logits_BLC = _chunk_logits(x_BLD, w_DC, ids_C, V)
    # d logsumexp / d logits = softmax (0 on padding), d target logit / d logits = one-hot: with the loss's
    # cotangents (weight w, plus 2 z w lse from a z-loss) this is w (softmax - onehot) + 2 z w lse softmax.
    dlogits_BLC = (g_lse_BL[..., None] * jnp.exp(logits_BLC - lse_BL[..., None])
                   + jnp.where(ids_C[None, None, :] == targets_BL[..., None], g_target_BL[..., None], 0.0))
    dlogits_BLC = dlogits_BLC.astype(x_BLD.dtype)  # as the model's logits are (compute dtype) before the float32 cast
    dx_BLD += jnp.einsum('BLC,DC->BLD', dlogits_BLC, w_DC.astype(x_BLD.dtype), preferred_element_type=jnp.float32)
    dw_DC = jnp.einsum('BLD,BLC->DC', x_BLD, dlogits_BLC, preferred_element_type=jnp.float32)
    return constrain(dx_BLD, ('act_batch', 'act_length', 'act_embed')), dw_DC

  dx_BLD = constrain(jnp.zeros(x_BLD.shape, jnp.float32), ('act_batch', 'act_length', 'act_embed'))
  dx_BLD, dw_nDC = jax.lax.scan(step, dx_BLD, (w_nDC, jnp.arange(n, dtype=jnp.int32)))
  dw_DV = jnp.transpose(dw_nDC, (1, 2, 0)).reshape(D, n * chunk)[:, :V]
  return dx_BLD.astype(x_BLD.dtype), dw_DV.astype(w_DV.dtype), None


chunked_logit_stats.defvjp(_chunked_fwd, _chunked_bwd)


def moe_loss(aux) -> jax.Array:
  """Weighted MoE balance + router z-loss, averaged over the MoE layers (0 for dense models).

  The mean (as MaxText does) keeps the losses' weight independent of depth; a sum would grow with the layers.
  """
  return jnp.mean(aux['loss']) if 'loss' in aux else jnp.zeros((), jnp.float32)
