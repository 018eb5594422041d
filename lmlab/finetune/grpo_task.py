"""GRPO as a fine-tuning task: each step samples G completions per prompt from the current policy, scores them
with the named reward functions and trains on that rollout (lmlab/finetune/grpo.py) through the one train step.

The rollout is the task's `next_batch(state, prompts)` hook, which the training loop calls before every step: the
KV-cache generator runs on the state's own (sharded) parameters, LoRA merged under jit, with a seed drawn from
(config.seed, step), so a resumed run samples exactly what an uninterrupted one does (the prompt iterator's
position is checkpointed like any batch iterator's). Evaluation: the language-model loss of the held-out gold
answers (eval_loss) and greedy exact match on `grpo.eval_prompts` held-out prompts (eval_exact_match).
"""
import functools

import jax
import numpy as np

from lmlab import generate
from lmlab.finetune import chat, data, grpo, grpo_loss, reference, reward_functions, tasks


class GrpoTask(tasks.SftTask):
  """finetune.task=grpo: a decoder learns from the rewards of its own samples of {prompt, answer} rows (c.grpo)."""
  kind = 'grpo'
  model_class = reference.ReferencedModel

  def __init__(self, config):
    g = config.grpo
    if g.group_size < 2 or config.batch_size % g.group_size:
      raise ValueError(f'grpo.group_size={g.group_size} must be >= 2 and divide batch_size={config.batch_size} '
                       '(each step samples batch_size / group_size prompts, group_size times each)')
    if jax.process_count() > 1:
      raise ValueError('finetune.task=grpo runs on one process (its rollouts sample on the host\'s prompts); '
                       'use the devices of one host')
    grpo_loss.loss_weights(np.zeros((1, 1)), g.normalization)  # a bad normalization fails now, not at step 1
    self.reward_fns = [(spec, reward_functions.make_reward_fn(spec)) for spec in g.rewards.split(',') if spec]
    if not self.reward_fns:
      raise ValueError('grpo.rewards is empty; name at least one reward function, e.g. exact_match')
    super().__init__(config)

  def setup_data(self) -> list[str]:
    if self.model_config.family != 'decoder':
      raise ValueError(f'finetune.task=grpo needs a causal decoder; init_from is an {self.model_config.family}')
    f, key = self.config.finetune, self.config.grpo.answer_key
    self.records, self.rows = {}, {}
    for split in dict.fromkeys((self.config.data.train_split, self.config.data.eval_split)):
      records = data.sft_records(self.config, split)
      for number, record in enumerate(records, 1):
        if f.prompt_key not in record or key not in record:
          raise ValueError(f'finetune.dataset={f.dataset} split {split} record {number} lacks {f.prompt_key!r} or '
                           f'{key!r}; GRPO rows need a prompt and the answer its rewards compare to')
      self.records[split] = [{**r, 'answer': str(r[key])} for r in records]
      self.rows[split] = [chat.sft_example(self.tokenizer, r[f.prompt_key], r['answer']) for r in self.records[split]]
    return []

  def prompt_ids(self, record) -> list[int]:
    """The prompt as SFT taught it: the chat rendering up to the assistant's turn."""
    user = [{'role': 'user', 'content': record[self.config.finetune.prompt_key]}]
    return self.tokenizer.encode(chat.render(self.tokenizer, user, add_generation_prompt=True))

  def batches(self, split: str, shuffle: bool, repeat: bool = True):
    """The prompts of each step: batch_size / group_size record numbers of the split."""
    n = len(self.records[split])
    return data.Batches(n, lambda i: {'record': np.int32(i)}, {'record': np.int32(-1)},
                        self.config.batch_size // self.config.grpo.group_size, self.config.seed, shuffle, repeat)

  def eval_batches(self, n: int) -> list:
    """The held-out prompts with their gold answers as SFT rows: eval_loss is the answers' loss."""
    rows = self.rows[self.config.data.eval_split]
    batches = data.Batches(len(rows), lambda i: self._row(*rows[i]), self._row([], []), self.config.batch_size,
                           self.config.seed, shuffle=False, repeat=False)
    return [b for _, b in zip(range(n), batches)]

  def loss_fn(self):
    g = self.config.grpo
    return grpo.grpo_loss_fn(self.model, self.eval_model, g.epsilon_low, g.epsilon_high, g.beta, g.temperature)

  @functools.cached_property
  def _policy_variables(self):
    """Jitted: the policy's Transformer variables (adapters merged, no reference copy), sharded as it is."""
    return jax.jit(lambda params, model_state: self.eval_model.transformer_variables(
        {'params': params, **{k: v for k, v in model_state.items() if k != reference.REFERENCE}}))

  def sample(self, state, prompts: list[list[int]], sampling: generate.Sampling, seed: int) -> list[list[int]]:
    """Completions (up to and including EOS) of `prompts` by the state's policy."""
    return generate.generate(self.model_config, self._policy_variables(state.params, state.model_state), prompts,
                             self.config.grpo.max_new_tokens, sampling, generate.stop_ids(self.tokenizer),
                             self.tokenizer.pad_id or 0, seed)

  def texts(self, completions: list[list[int]]) -> list[str]:
    """Completions as text, without their end token."""
    stops = set(generate.stop_ids(self.tokenizer))
    return [self.tokenizer.decode([t for t in c if t not in stops]) for c in completions]

  def rewards(self, records, completions: list[list[int]]) -> np.ndarray:
    """[len(completions)] rewards, the sum of grpo.rewards' functions."""
    prompts, texts = [r[self.config.finetune.prompt_key] for r in records], self.texts(completions)
    return sum(fn(prompts, texts, records) for _, fn in self.reward_fns)

  def next_batch(self, state, prompts):
    """The rollout of the next prompts: G samples each (group-major), their rewards and the batch to train on."""
    g = self.config.grpo
    split = self.config.data.train_split
    records = [self.records[split][i] for i in next(prompts)['record'] for _ in range(g.group_size)]
    prompt_ids = [self.prompt_ids(r) for r in records]
    step = int(state.step)
    completions = self.sample(state, prompt_ids, generate.Sampling(g.temperature, 0, g.top_p),
                              seed=self.config.seed * 1_000_003 + step)
    rewards_NG = self.rewards(records, completions).reshape(-1, g.group_size)
    rows = [self._row(p + c, [0.0] * len(p) + [1.0] * len(c)) for p, c in zip(prompt_ids, completions)]
    batch = grpo.rollout_batch(rows, rewards_NG, g.normalization, g.scale_rewards)
    metrics = {'grpo/reward_mean': float(rewards_NG.mean()), 'grpo/reward_std': float(rewards_NG.std()),
               'grpo/response_length': float(np.mean([len(c) for c in completions])),
               'grpo/zero_variance_groups': float(np.mean(grpo_loss.zero_variance_groups(rewards_NG)))}
    return batch, metrics

  def check_metrics(self, step: int, values: dict) -> None:
    kl, limit = float(values.get('grpo/kl', 0.0)), self.config.grpo.max_kl
    if limit and kl > limit:
      raise FloatingPointError(f'GRPO policy diverged at step {step}: KL to the reference {kl:.4g} > grpo.max_kl='
                               f'{limit}; its checkpoints so far are kept (this state is not saved); lower '
                               'learning_rate or raise grpo.beta')

  def eval_metrics(self, state) -> dict:
    """Greedy exact match on the first grpo.eval_prompts held-out prompts."""
    records = self.records[self.config.data.eval_split][:self.config.grpo.eval_prompts]
    completions = self.sample(state, [self.prompt_ids(r) for r in records], generate.Sampling(), seed=0)
    exact_match = reward_functions.make_reward_fn('exact_match')
    return {'eval_exact_match': float(np.mean(exact_match([''] * len(records), self.texts(completions), records)))}

  def finetune_metadata(self) -> dict:
    return {**super().finetune_metadata(), 'grpo': self.config.grpo.to_dict()}

