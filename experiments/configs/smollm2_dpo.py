"""SmolLM2-135M-Instruct (offline GGUF) taught by DPO to prefer a stdlib function's own docstring summary over
another function's: LoRA, so the reference is the same weights with the adapters off."""
from experiments.configs.base import get_base_config
from lmlab.convert.offline import offline_model


def get_config():
  c = get_base_config()
  c.init_from = offline_model('smollm2') or ''  # the installed package's model, when present
  c.finetune.task = 'dpo'
  c.finetune.dpo_beta = 0.1
  c.steps = 200
  c.batch_size = 8
  c.seq_len = 128
  c.learning_rate = 5e-4
  c.warmup_steps = 20
  c.weight_decay = 0.0
  c.eval_every = 50
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.model.compute_dtype = 'float32'
  return c
