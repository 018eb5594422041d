"""What the attribution methods explain, as one hashable function of a batched capture: a fine-tuned classifier's
class logit or a token's log-probability at a position. Positions and targets are arguments, not constants, so one
compiled attribution serves every input of the same padded length."""
import dataclasses

import jax
import jax.numpy as jnp

from lmlab.finetune.tasks import HEAD_KEYS
from lmlab.models import ModelConfig
from lmlab.models.heads import ClassificationHead


@dataclasses.dataclass(frozen=True)
class Objective:
  """num_classes 0: the log-probability of a token after each row's `position` (decoders: the next token).
  Otherwise the logit of a class of lmlab.finetune's classification head, pooled with `pooling`."""
  config: ModelConfig
  num_classes: int = 0
  pooling: str = 'mean'

  @property
  def kind(self) -> str:
    if self.num_classes:
      return 'class logit'
    if self.config.family == 'decoder':
      return 'next-token log-probability'
    return 'token log-probability at the last position'

  def scores(self, head_params: dict, captured: dict, real_BL, positions_B):
    """[B, classes or vocabulary], float32: class logits (padding left out of the pooling, `real_BL` 0 there), or
    log-probabilities of the token after positions_B."""
    c = self.config
    if self.num_classes:
      hidden_BLD = captured[f'layers/{c.num_layers - 1}/residual_out'] if c.post_norm else captured['final_norm']
      return ClassificationHead(c, self.num_classes, self.pooling).apply({'params': head_params}, hidden_BLD, real_BL)
    logits_BV = jnp.take_along_axis(captured['logits'], jnp.asarray(positions_B)[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(logits_BV.astype(jnp.float32))

  def __call__(self, head_params: dict, captured: dict, real_BL, positions_B, targets_B):
    """[B]: each row's explained score, scores(...)[b, targets_B[b]]."""
    scores_BC = self.scores(head_params, captured, real_BL, positions_B)
    return jnp.take_along_axis(scores_BC, jnp.asarray(targets_B)[:, None], axis=1)[:, 0]


def for_model(config: ModelConfig, params: dict) -> tuple[Objective, dict]:
  """(Objective, its head params): a class logit when `params` hold a fine-tuned classifier (lmlab.finetune),
  else a token log-probability. A checkpoint keeps a BERT pooler only when its head pools with it (fine-tuning drops
  an unused one)."""
  if 'classifier' not in params:
    return Objective(config), {}
  head = {k: params[k] for k in HEAD_KEYS if k in params}
  return Objective(config, int(params['classifier']['bias'].shape[0]), 'pooler' if 'pooler' in head else 'mean'), head
