"""Feed-forward block: SwiGLU (Llama) or GELU (BERT)."""
import flax.linen as nn
import jax

from lmlab.models.config import ModelConfig
from lmlab.models.layers import Dense, constrain


class Mlp(nn.Module):
  config: ModelConfig
  ffn_dim: int

  @nn.compact
  def __call__(self, x_BLD):
    c = self.config
    dense = lambda features, names, name: Dense((features,), names, c, use_bias=c.out_bias, name=name)
    if c.mlp == 'swiglu':
      gate_BLF = dense(self.ffn_dim, ('embed', 'mlp'), 'gate')(x_BLD)
      up_BLF = dense(self.ffn_dim, ('embed', 'mlp'), 'up')(x_BLD)
      h_BLF = jax.nn.silu(gate_BLF) * up_BLF
    elif c.mlp == 'gelu':
      h_BLF = jax.nn.gelu(dense(self.ffn_dim, ('embed', 'mlp'), 'up')(x_BLD), approximate=False)
    else:
      raise ValueError(f'model.mlp={c.mlp!r} is not one of swiglu, gelu')
    h_BLF = constrain(h_BLF, ('act_batch', 'act_length', 'act_mlp'))
    return dense(x_BLD.shape[-1], ('mlp', 'embed'), 'down')(h_BLF)
