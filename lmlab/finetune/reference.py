"""A policy beside its frozen reference (DPO, GRPO's KL) without a second copy of the weights where LoRA allows it.

The reference is the model as training starts. With LoRA it is the same network with the adapters off (the
frozen base weights); with full fine-tuning a copy of the initial weights sits in the non-trainable `reference`
collection of model_state, so it is sharded like the params and checkpointed with the run (a resumed run keeps
the same reference).
"""
import dataclasses

import jax
import jax.numpy as jnp

from lmlab.finetune import tasks

REFERENCE = 'reference'


@dataclasses.dataclass(frozen=True)
class ReferencedModel(tasks.FinetuneModel):
  """A FinetuneModel that also holds (full fine-tuning) or implies (LoRA: adapters off) its reference weights."""

  def init(self, rngs, tokens_BL):
    variables = super().init(rngs, tokens_BL)
    if self.method == 'full':
      variables[REFERENCE] = jax.tree.map(jnp.copy, variables['params'])  # boxes kept: sharded like the params
    return variables

  def apply(self, variables, *args, **kwargs):
    return super().apply({k: v for k, v in variables.items() if k != REFERENCE}, *args, **kwargs)

  def destinations(self, names: list[str]) -> list[str]:
    """A pretrained parameter's places: the policy's, and (full fine-tuning) the reference's copy of it, so the
    reference is the pretrained model. Placed separately, so the donated train step never frees it."""
    places = super().destinations(names)
    return places + [f'model_state/{REFERENCE}/{"/".join(names)}'] if self.method == 'full' else places

  def reference_variables(self, model_state):
    """The reference's variables: the initial-weights copy, or the frozen base with no trainable adapters."""
    rest = {k: v for k, v in model_state.items() if k != REFERENCE}
    if REFERENCE in model_state:
      return {**rest, 'params': model_state[REFERENCE], 'frozen': {}}
    return {**rest, 'params': {}}

