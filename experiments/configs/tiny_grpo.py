"""A tiny byte-level decoder learns verifiable arithmetic ("What is 7 - 12?"): SFT warm start, then GRPO.

  python -m experiments.finetune --config=experiments/configs/tiny_grpo.py:sft --workdir=runs/tiny_grpo_sft
  python -m experiments.finetune --config=experiments/configs/tiny_grpo.py --workdir=runs/tiny_grpo
The SFT stage trains from scratch on the train split's gold answers and stops part-way; GRPO then learns from
exact-match rewards of its own samples, logging greedy held-out exact match as eval_exact_match at every evaluation
(step 0 is the SFT start). Measured on 2 CPU cores (SFT 86 s, GRPO 217 s): held-out exact match 0.538 -> 0.620 over
158 problems (peak 0.633), sampled reward 0.39 -> 0.54 (first vs last 20 steps); seed 1 0.538 -> 0.608, lr 3e-4
0.538 -> 0.608 (seed 0) and 0.570 (seed 1).
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
  c.data.validation_fraction = 0.2   # 158 held-out problems (642 train): at 0.1 (69) one eval moved +-0.07 by chance
  c.seq_len = 40                     # 'User: What is 19 + 19?\nAssistant: ' is 34 bytes; 6 sampled tokens fit
  c.weight_decay = 0.0
  c.eval_batches = 5                 # every held-out answer in eval_loss
  c.model.vocab_size = 260           # the 256 bytes + EOS, divisible by 4
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 384
  c.model.compute_dtype = 'float32'
  if stage == 'sft':
    c.batch_size = 32
    c.steps = 400                    # stops part-way through learning to add: held-out exact match well under 1
    c.learning_rate = 3e-3
    c.warmup_steps = 40
    c.eval_every = 100
    c.checkpoint_every = 400
  else:
    c.init_from = 'runs/tiny_grpo_sft'
    # GRPO's gradient is noisy: 4 prompts a step or lr 1e-3 only shook the policy (reward fell 0.33 -> 0.17 in 20
    # steps at 1e-3), and a weaker SFT start (350 steps, exact match ~0.2) gave too few rewarded groups to learn
    # from; 32 prompts x 4 samples at 2e-4 from a ~0.5 start raise it.
    c.batch_size = 128
    c.steps = 200
    c.learning_rate = 2e-4
    c.warmup_steps = 5
    c.eval_every = 20
    c.eval_at_start = True           # eval_exact_match of the SFT start, logged as step 0
    c.checkpoint_every = 100
    c.log_every = 1
    c.grpo.group_size = 4
    c.grpo.max_new_tokens = 6        # '-19\n' + EOS is 5
    c.grpo.rewards = 'exact_match'
    c.grpo.beta = 0.0
    c.grpo.eval_prompts = 158        # all of the held-out problems
    c.grpo.max_kl = 1.0
  return c
