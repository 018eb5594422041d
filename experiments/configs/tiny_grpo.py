"""A tiny byte-level decoder learns verifiable arithmetic ("What is 7 - 12?"): SFT warm start, then GRPO.

  python -m experiments.finetune --config=experiments/configs/tiny_grpo.py:sft --workdir=runs/tiny_grpo_sft
  python -m experiments.finetune --config=experiments/configs/tiny_grpo.py --workdir=runs/tiny_grpo \\
      --config.init_from=runs/tiny_grpo_sft
The SFT stage trains from scratch on the train split's gold answers; GRPO then learns from exact-match rewards of
its own samples, logging greedy held-out exact match as eval_exact_match at every evaluation.
"""
from experiments.configs.base import get_base_config


def get_config(stage: str = 'grpo'):
  if stage not in ('sft', 'grpo'):
    raise ValueError(f'tiny_grpo stage {stage!r}: use experiments/configs/tiny_grpo.py:sft or :grpo')
  c = get_base_config()
  c.finetune.task = stage
  c.finetune.dataset = 'arithmetic'
  c.finetune.method = 'full'
  c.finetune.response_key = 'answer'
  c.data.validation_fraction = 0.1   # 80 held-out problems
  c.batch_size = 32
  c.seq_len = 48                     # 'User: What is 19 - 7?\nAssistant: ' is 34 bytes; answer + EOS <= 4
  c.weight_decay = 0.0
  c.eval_batches = 4
  c.model.vocab_size = 260           # the 256 bytes + EOS, divisible by 4
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 384
  c.model.compute_dtype = 'float32'
  if stage == 'sft':
    c.steps = 400                    # stops part-way: held-out exact match well under 1, so GRPO has room
    c.learning_rate = 3e-3
    c.warmup_steps = 40
    c.eval_every = 100
    c.checkpoint_every = 400
  else:
    c.init_from = 'runs/tiny_grpo_sft'
    c.steps = 60
    c.learning_rate = 3e-5
    c.warmup_steps = 5
    c.eval_every = 10
    c.checkpoint_every = 20
    c.log_every = 1
    c.grpo.group_size = 8          # 4 prompts x 8 samples per step
    c.grpo.max_new_tokens = 6
    c.grpo.rewards = 'exact_match'
    c.grpo.beta = 0.0
    c.grpo.eval_prompts = 80
    c.grpo.max_kl = 1.0
  return c
