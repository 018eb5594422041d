"""Multi-head / grouped-query / multi-query attention with RoPE, causal and packed-segment masks.

Decoding: when the `cache` collection is mutable (and the model is not being initialised), each call
appends its keys and values to a KV cache and attends over everything cached so far (see `kv_cache`).
Interpretability: the `heads` site (layers.site) is each head's output before the output projection.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmlab.models.config import ModelConfig
from lmlab.models.layers import Dense, constrain, rope, site


def attention_mask(segment_ids_BL, causal: bool, kv_segment_ids_BS=None):
  """True where query l may attend key s: same packed document and, if causal, s <= l."""
  kv = segment_ids_BL if kv_segment_ids_BS is None else kv_segment_ids_BS
  mask_BLS = segment_ids_BL[:, :, None] == kv[:, None, :]
  if causal:
    L, S = segment_ids_BL.shape[1], kv.shape[1]
    mask_BLS &= jnp.tril(jnp.ones((L, S), bool), k=S - L)[None]
  return mask_BLS


def einsum_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS):
  """Plain softmax attention that also returns the weights (for interpretability and as a reference)."""
  B, L, H, K = q_BLHK.shape
  G = k_BSGK.shape[2]
  q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)
  logits_BGRLS = jnp.einsum('BLGRK,BSGK->BGRLS', q_BLGRK, k_BSGK, preferred_element_type=jnp.float32)
  logits_BGRLS = jnp.where(mask_BLS[:, None, None], logits_BGRLS * K**-0.5, jnp.finfo(jnp.float32).min)
  probs_BGRLS = jax.nn.softmax(logits_BGRLS, axis=-1)
  out_BLGRK = jnp.einsum('BGRLS,BSGK->BLGRK', probs_BGRLS.astype(v_BSGK.dtype), v_BSGK)
  return out_BLGRK.reshape(B, L, H, K), probs_BGRLS.reshape(B, H, L, -1)


def fused_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, causal: bool, implementation: str = 'auto',
                    kv_segment_ids_BS=None):
  """jax.nn.dot_product_attention; 'auto' is cuDNN flash attention on GPU in 16-bit, XLA elsewhere.

  cuDNN gets causality as its mask type (it then skips the upper triangle) and packed segments as a
  boolean mask; XLA gets one combined mask.
  """
  if implementation == 'auto':
    half = q_BLHK.dtype in (jnp.bfloat16, jnp.float16)
    implementation = 'cudnn' if jax.default_backend() == 'gpu' and half else 'xla'
  if implementation == 'cudnn':
    segments_B1LS = attention_mask(segment_ids_BL, False, kv_segment_ids_BS)[:, None]
    return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=segments_B1LS, is_causal=causal,
                                        implementation='cudnn')
  mask_B1LS = attention_mask(segment_ids_BL, causal, kv_segment_ids_BS)[:, None]
  return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask_B1LS, implementation=implementation)


def cached_mask(segment_ids_BL, kv_segment_ids_BS, index):
  """Decoding mask: same segment and key slot <= query slot, the queries sitting at slots index..index+L-1."""
  L, S = segment_ids_BL.shape[1], kv_segment_ids_BS.shape[1]
  causal_LS = jnp.arange(S)[None, :] <= index + jnp.arange(L)[:, None]
  return (segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]) & causal_LS[None]


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    c = self.config
    H, G, K, D = c.num_heads, c.num_kv_heads, c.dims_per_head, c.d_model
    q_BLHK = Dense((H, K), ('embed', 'heads', 'head_dim'), c, use_bias=c.attention_bias, name='query')(x_BLD)
    k_BLGK = Dense((G, K), ('embed', 'kv_heads', 'head_dim'), c, use_bias=c.attention_bias, name='key')(x_BLD)
    v_BLGK = Dense((G, K), ('embed', 'kv_heads', 'head_dim'), c, use_bias=c.attention_bias, name='value')(x_BLD)
    if c.position == 'rope':
      q_BLHK = rope(q_BLHK, positions_BL, c.rope_base, c)
      k_BLGK = rope(k_BLGK, positions_BL, c.rope_base, c)
    # Names for the remat policies (config.REMAT_SAVE_SETS); identities otherwise.
    q_BLHK = checkpoint_name(constrain(q_BLHK, ('act_batch', 'act_length', 'act_heads', None)), 'query_proj')
    k_BLGK = checkpoint_name(constrain(k_BLGK, ('act_batch', 'act_length', 'act_kv_heads', None)), 'key_proj')
    v_BLGK = checkpoint_name(constrain(v_BLGK, ('act_batch', 'act_length', 'act_kv_heads', None)), 'value_proj')

    causal = c.family == 'decoder'
    if self.is_mutable_collection('cache') and not self.is_initializing():
      k_BSGK, v_BSGK, kv_segment_ids_BS, index = self.kv_cache(k_BLGK, v_BLGK, segment_ids_BL)
      # Plain einsum: a decode step has one query per row, nothing for a flash kernel to save.
      out_BLHK, _ = einsum_attention(q_BLHK, k_BSGK, v_BSGK, cached_mask(segment_ids_BL, kv_segment_ids_BS, index))
    elif c.attention == 'einsum':
      out_BLHK, probs_BHLS = einsum_attention(q_BLHK, k_BLGK, v_BLGK, attention_mask(segment_ids_BL, causal))
      self.sow('intermediates', 'attention_weights', probs_BHLS)
    else:
      out_BLHK = fused_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal, c.attention)
    out_BLHK = site(self, 'heads', constrain(out_BLHK, ('act_batch', 'act_length', 'act_heads', None)))
    out_BLHK = checkpoint_name(out_BLHK, 'attention_context')
    out_BLD = Dense((D,), ('heads', 'head_dim', 'embed'), c, in_axes=2, use_bias=c.out_bias, name='out')(out_BLHK)
    return checkpoint_name(out_BLD, 'attention_out')

  def kv_cache(self, k_BLGK, v_BLGK, segment_ids_BL):
    """Writes this call's keys/values (G kv heads only) at the cache index; returns the whole cache.

    The first call with no cache creates one as long as its input (generate.init_cache does this under
    eval_shape to get the shapes). Slots not yet written keep segment id 0, like padding, so the mask
    hides them; a prompt's real tokens carry segment 1.
    """
    B, L, G, K = k_BLGK.shape
    key = self.variable('cache', 'cached_key', jnp.zeros, (B, L, G, K), k_BLGK.dtype)
    value = self.variable('cache', 'cached_value', jnp.zeros, (B, L, G, K), v_BLGK.dtype)
    segments = self.variable('cache', 'cached_segment_ids', jnp.zeros, (B, L), jnp.int32)
    index = self.variable('cache', 'cache_index', jnp.zeros, (), jnp.int32)
    i = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BLGK.astype(key.value.dtype), (0, i, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BLGK.astype(value.value.dtype), (0, i, 0, 0))
    segments.value = jax.lax.dynamic_update_slice(segments.value, segment_ids_BL.astype(jnp.int32), (0, i))
    index.value = i + L
    return key.value, value.value, segments.value, i
