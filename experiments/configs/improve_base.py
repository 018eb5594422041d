"""Every key of the self-improvement loop (lmlab/improve/loop.py), on top of the base config; presets override a few.

The `improve` section drives the loop; the rest of the config (model, data.tokenizer, learning rate, batch,
finetune.method, the grpo section) is what each train stage fine-tunes with (finetune.task, dataset, init_from and
steps are set per stage by the loop). With init_from set, the loop starts from that pretrained model instead of
training a base (base_examples and base_steps are then unused).
"""
import ml_collections

from experiments.configs.base import get_base_config


def get_improve_config() -> ml_collections.ConfigDict:
  c = get_base_config()
  i = ml_collections.ConfigDict()
  i.iterations = 3              # rounds of generate, score, select, train, evaluate, gate after the base
  i.pause_for_review = False    # stop after each round's samples are generated, for people to judge them
                                # (experiments.review); rerun the same command to score with their feedback
  i.base_digits = 3             # the base model is trained on correct additions of 1 .. base_digits digits; round i
                                # labels (base_digits + i)-digit problems itself; held-out: base_digits+1 .. +iterations
  i.pad_to = 6                  # operands zero-padded to this many digits (the sum to one more), so every answer digit
                                # sits at a fixed distance from its operands (lmlab/improve/addition.py); 0: unpadded
                                # (and for notation=plain); at least base_digits + iterations
  i.notation = 'reversed'       # reversed (least significant digit first, lmlab/improve/addition.py) | plain
  i.question = '{a}+{b}='       # the question of operands a and b as written, e.g. 'What is {a} + {b}?'
  i.base_examples = 2000        # correct base problems per digit count (fewer when fewer distinct ones exist)
  i.base_steps = 1000           # optimizer steps of the base model's supervised training (from scratch)
  i.eval_examples = 200         # held-out and guard problems per digit count (frozen: written once per workdir)
  i.pool_size = 500             # prompts generated per round (not in the held-out set)
  i.samples_per_prompt = 5      # K samples per prompt
  i.temperature = 0.7           # of those samples
  i.max_new_tokens = 12         # longest answer generated, in tokens
  i.batch_size = 64             # generation and evaluation rows per batch (KV-cache decoding)
  i.scorers = 'majority,format'  # comma-separated rules: verifier (right under `match`) | majority (self-consistency
                                 # vote) | format (format_regex) | length (max_chars); and graded scores: judge
                                 # (P(judge_verdict) under the judge model) | reward_model (sigmoid of its score);
                                 # reward = product of the rules x mean of the graded scores (lmlab/improve/scorers.py)
  i.match = 'exact'             # verifier and held-out accuracy: exact (the whole stripped answer) | number (the
                                # last number in the text, by value: for models that answer in a sentence)
  i.majority_min_share = 0.6    # majority: the winning answer needs at least this share of the K votes
  i.format_regex = r'\d+'       # format: the whole answer must match
  i.max_chars = 64              # length: longest accepted answer, in characters
  i.judge = ''                  # judge: the judge model, any lmlab.convert.load_model path (a GGUF file, ...)
  i.judge_template = 'Question: {question}\nAnswer: {response}\nIs the answer correct? Reply Yes or No.'
                                # judge: what it reads, with the pool question and the sample
  i.judge_verdict = 'Yes'       # judge: the continuation whose probability is the score
  i.judge_contrast = ''         # judge: its opposite ('No'): the score is then p(verdict) / (p(verdict) + p(contrast))
  i.judge_chat = True           # judge: the template is a user turn of the judge's chat template, the verdict
                                # opens its reply; false: plain text followed by the verdict
  i.reward_model = ''           # reward_model: a finetune.task=reward workdir or export (lmlab.rewards.RewardModel)
  i.threshold = 1.0             # sft: samples with at least this reward are kept (ReST-EM's binary filter)
  i.max_per_prompt = 1          # sft: at most m kept samples per prompt (distinct texts)
  i.method = 'sft'              # sft (rejection sampling) | dpo (best vs worst sample per prompt) | grpo (finetune
                                # task grpo on the round's prompts, rewarded by these scorers; majority excluded)
  i.dpo_margin = 0.5            # dpo: the best sample's reward must exceed the worst's by this much
  i.train_from = 'current'      # current (continue from the accepted model) | base (ReST-EM: from the base each round)
  i.accumulate = True           # sft: train on the current model's data plus this round's (base data + accepted
                                # rounds), as Self-Improving Transformers does; false: this round's rows only
  i.steps = 300                 # optimizer steps per round
  i.guard_tolerance = 0.05      # the largest accepted drop of a guard's accuracy (in-distribution additions)
  i.confidence = 0.95           # the gate's paired bootstrap interval of the held-out gain must lie above 0
  i.n_boot = 1000               # bootstrap resamples of that interval
  c.improve = i
  c.finetune.method = 'full'    # of each train stage (the base, trained from scratch, always full); lora for a large
                                # pretrained init_from
  c.progress = False            # stages log one line each instead
  return c
