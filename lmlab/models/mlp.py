"""Feed-forward block: SwiGLU (Llama) or GELU (BERT)."""
import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from lmlab.models.config import ModelConfig
from lmlab.models.layers import Dense, constrain


class Mlp(nn.Module):
  config: ModelConfig
  ffn_dim: int

  @nn.compact
  def __call__(self, x_BLD):
    c = self.config
    dense = lambda features, names, name: Dense((features,), names, c, use_bias=c.out_bias, name=name)
    # checkpoint_name: the names the remat policies keep (config.REMAT_SAVE_SETS); identities otherwise.
    up = lambda name: checkpoint_name(dense(self.ffn_dim, ('embed', 'mlp'), name)(x_BLD), 'mlp_in')
    if c.mlp == 'swiglu':
      h_BLF = jax.nn.silu(up('gate')) * up('up')
    elif c.mlp == 'gelu':
      h_BLF = jax.nn.gelu(up('up'), approximate=False)
    else:
      raise ValueError(f'model.mlp={c.mlp!r} is not one of swiglu, gelu')
    h_BLF = checkpoint_name(constrain(h_BLF, ('act_batch', 'act_length', 'act_mlp')), 'mlp_hidden')
    return checkpoint_name(dense(x_BLD.shape[-1], ('mlp', 'embed'), 'down')(h_BLF), 'mlp_out')
