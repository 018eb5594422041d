"""SmolLM2-135M-Instruct (offline GGUF) taught by DPO to prefer a stdlib function's own docstring summary over
another function's: smollm2_sft's settings with LoRA, so the reference is the same weights with the adapters off."""
from experiments.configs import smollm2_sft


def get_config():
  c = smollm2_sft.get_config()
  c.finetune.task = 'dpo'
  c.finetune.dpo_beta = 0.1
  c.eval_every = 50
  return c
