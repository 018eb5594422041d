"""MiniLM-L6 (all-MiniLM-L6-v2) classifying stdlib docstrings by package: LoRA on q/v + a mean-pooled head."""
from experiments.configs.base import get_base_config
from lmlab.convert.offline import offline_model


def get_config():
  c = get_base_config()
  c.init_from = offline_model('minilm') or ''  # the installed package's model, when present
  c.data.validation_fraction = 0.2  # ~300 held-out docstrings: a steadier accuracy than 5%
  c.finetune.task = 'classify'
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.learning_rate = 1e-3
  c.warmup_steps = 20
  c.weight_decay = 0.01
  c.eval_every = 100
  c.eval_batches = 64               # covers the whole validation split (one pass, never repeated)
  c.checkpoint_every = 100
  c.model.compute_dtype = 'float32'
  return c
