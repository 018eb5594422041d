"""Task heads on top of the transformer's final hidden states."""
import flax.linen as nn
import jax.numpy as jnp

from lmlab.models.config import ModelConfig
from lmlab.models.layers import Dense

POOLINGS = ('pooler', 'mean')


class ClassificationHead(nn.Module):
  """Hidden states -> class logits through a pooled vector.

  pooling='pooler': BERT's pooler, dense + tanh on the first token ([CLS]); its params are named like
  `lmlab.convert`'s `params['pooler']`, so a pretrained pooler drops in. pooling='mean': the mean over
  non-padding tokens (what sentence-transformers models such as MiniLM were trained to produce).
  """
  config: ModelConfig
  num_classes: int
  pooling: str = 'mean'

  @nn.compact
  def __call__(self, hidden_BLD, mask_BL):
    c = self.config
    if self.pooling == 'pooler':
      pooled_BD = jnp.tanh(Dense((c.d_model,), ('embed', None), c, use_bias=True, name='pooler')(hidden_BLD[:, 0]))
    elif self.pooling == 'mean':
      weights_BL1 = mask_BL[..., None].astype(jnp.float32)
      pooled_BD = jnp.sum(hidden_BLD.astype(jnp.float32) * weights_BL1, 1) / jnp.maximum(jnp.sum(weights_BL1, 1), 1.0)
    else:
      raise ValueError(f'finetune.pooling={self.pooling!r} is not one of {", ".join(POOLINGS)}')
    logits_BC = Dense((self.num_classes,), ('embed', None), c, use_bias=True, name='classifier')(pooled_BD)
    return logits_BC.astype(jnp.float32)
