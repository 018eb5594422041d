"""SmolLM2-135M-Instruct (offline GGUF) taught to summarise stdlib functions: LoRA SFT in its chat template."""
from experiments.configs.base import get_base_config
from lmlab.convert.offline import offline_model


def get_config():
  c = get_base_config()
  c.init_from = offline_model('smollm2') or ''  # the installed package's model, when present
  c.finetune.task = 'sft'
  c.steps = 200
  c.batch_size = 8
  c.seq_len = 128
  c.learning_rate = 5e-4
  c.warmup_steps = 20
  c.weight_decay = 0.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.model.compute_dtype = 'float32'
  return c
