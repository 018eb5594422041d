"""The transformer: embeddings, a scanned stack of blocks, final norm and LM head.

Decoders (Llama-style: pre-RMSNorm, RoPE, GQA, SwiGLU) and encoders (BERT-style: learned positions,
token types, post-LayerNorm, GELU) are the same modules with different ModelConfig switches.
Layers are grouped `layers_per_group` at a time (a MoE model with `moe.every=n` puts MoE in the
last block of each group) and the groups are stacked with `nn.scan`, so compile time does not grow
with depth; parameters of the stack carry the logical axis `layers` first.
Named activations (`site`: residual stream, attention and MLP outputs, final norm, logits) can be captured and
patched by lmlab.interpret; they cost nothing unless its collections are passed. Separately, checkpoint names inside
each block (config.REMAT_SAVE_SETS) are what the save_* / offload_* remat policies keep.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from lmlab.models.attention import Attention
from lmlab.models.config import REMAT_SAVE_SETS, ModelConfig
from lmlab.models.layers import Dense, Norm, constrain, dtype, embed_init, partitioned, site
from lmlab.models.mlp import Mlp

_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    'full': None,
    'dots_saveable': _policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': _policies.dots_with_no_batch_dims_saveable,
    'nothing_saveable': _policies.nothing_saveable,
    # Keep the named activations (config.REMAT_SAVE_SETS) in device memory, or move them to pinned host memory and
    # back for the backward pass; everything else is recomputed.
    **{f'save_{key}': _policies.save_only_these_names(*names) for key, names in REMAT_SAVE_SETS.items()},
    **{f'offload_{key}': _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=names, offload_src='device',
        offload_dst='pinned_host') for key, names in REMAT_SAVE_SETS.items()},
}


class Block(nn.Module):
  """Attention + feed-forward with residuals; pre-norm (Llama) or post-norm (BERT)."""
  config: ModelConfig
  use_moe: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    c = self.config
    drop = lambda y: nn.Dropout(c.dropout)(y, deterministic=self.deterministic)
    if self.use_moe:
      from lmlab.models.moe import MoeMlp  # pylint: disable=g-import-not-at-top  (MoE is optional)
      ffn = lambda y: MoeMlp(c, name='moe')(y, segment_ids_BL)
    else:
      ffn = lambda y: (Mlp(c, c.ffn_dim, name='mlp')(y), {})
    attn = lambda y: site(self, 'attention_output', Attention(c, name='attn')(y, positions_BL, segment_ids_BL))
    x_BLD = site(self, 'residual_in', x_BLD)
    if c.post_norm:
      h_BLD = Norm(c, name='attn_norm')(x_BLD + drop(attn(x_BLD)))
      y_BLD, aux = ffn(h_BLD)
      out_BLD = Norm(c, name='mlp_norm')(h_BLD + drop(site(self, 'mlp_output', y_BLD)))
    else:
      h_BLD = x_BLD + drop(attn(Norm(c, name='attn_norm')(x_BLD)))
      y_BLD, aux = ffn(Norm(c, name='mlp_norm')(h_BLD))
      out_BLD = h_BLD + drop(site(self, 'mlp_output', y_BLD))
    return site(self, 'residual_out', constrain(out_BLD, ('act_batch', 'act_length', 'act_embed'))), aux


class BlockGroup(nn.Module):
  """`layers_per_group` blocks; the unit that nn.scan repeats. Returns the MoE block's metrics."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    c = self.config
    aux = {}
    for i in range(c.layers_per_group):
      use_moe = c.is_moe and i == c.layers_per_group - 1
      x_BLD, block_aux = Block(c, use_moe, self.deterministic, name=f'block_{i}')(x_BLD, positions_BL, segment_ids_BL)
      aux = block_aux or aux
    return x_BLD, aux


class Transformer(nn.Module):
  """Token ids in; logits (or final hidden states) and per-layer auxiliary metrics out."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, token_types_BL=None,
               return_hidden: bool = False):
    c = self.config
    B, L = tokens_BL.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((B, L), jnp.int32)
    embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=partitioned(embed_init(), ('vocab', 'embed')),
                     dtype=dtype(c.compute_dtype), param_dtype=dtype(c.param_dtype), name='embed')
    x_BLD = site(self, 'embeddings', embed(tokens_BL))  # token embeddings: what attribution differentiates
    if c.position == 'learned':
      x_BLD += nn.Embed(c.max_len, c.d_model, embedding_init=partitioned(embed_init(), (None, 'embed')),
                        param_dtype=dtype(c.param_dtype), name='pos_embed')(positions_BL).astype(x_BLD.dtype)
    if c.type_vocab_size:
      types_BL = jnp.zeros_like(tokens_BL) if token_types_BL is None else token_types_BL
      x_BLD += nn.Embed(c.type_vocab_size, c.d_model, embedding_init=partitioned(embed_init(), (None, 'embed')),
                        param_dtype=dtype(c.param_dtype), name='type_embed')(types_BL).astype(x_BLD.dtype)
    if c.post_norm:
      x_BLD = Norm(c, name='embed_norm')(x_BLD)
    x_BLD = nn.Dropout(c.dropout)(x_BLD, deterministic=self.deterministic)
    x_BLD = constrain(x_BLD, ('act_batch', 'act_length', 'act_embed'))

    group = BlockGroup
    if c.remat != 'none':
      if c.remat not in REMAT_POLICIES:
        raise ValueError(f'model.remat={c.remat!r} is not one of none, {", ".join(REMAT_POLICIES)}')
      group = nn.remat(group, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
    # Every per-layer collection is stacked over layers; 'intermediates' and 'patches' are lmlab.interpret's sites.
    per_layer = {'params': 0, 'intermediates': 0, 'patches': 0, 'router_state': 0, 'cache': 0}
    stack = nn.scan(group, variable_axes=per_layer, split_rngs={'params': True, 'dropout': True},
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=c.num_layers // c.layers_per_group, metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BLD, aux = stack(c, self.deterministic, name='layers')(x_BLD, positions_BL, segment_ids_BL)
    if not c.post_norm:
      x_BLD = site(self, 'final_hidden', Norm(c, name='final_norm')(x_BLD))
    if return_hidden:
      return x_BLD, aux
    if c.tie_embeddings:  # `unembedding` below hands out the same weight
      logits_BLV = embed.attend(x_BLD)
    else:
      logits_BLV = Dense((c.vocab_size,), ('embed', 'vocab'), c, name='lm_head')(x_BLD)
    return site(self, 'logits', constrain(logits_BLV, ('act_batch', 'act_length', 'act_vocab'))), aux

  def unembedding(self):
    """The LM head's weight [D, V] in its param dtype and sharding (the tied embedding transposed, or lm_head's
    kernel): what the chunked loss multiplies return_hidden's states by. `model.apply(variables, method=...)`."""
    params = self.variables['params']
    return params['embed']['embedding'].T if self.config.tie_embeddings else params['lm_head']['kernel']
