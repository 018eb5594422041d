"""The loop's stages as functions of files: each reads what earlier stages wrote and writes its own output atomically.

generate  K sampled completions per pool prompt from the current model (batched KV-cache decoding, seeded)
score     the automated scorers, then human feedback where a person judged a sample
select    SFT rows by rejection sampling, DPO pairs, or the round's prompts for GRPO
train     fine-tune (lmlab.finetune.trainer: sft, dpo or grpo) from the base or the current model; resumes from its
          own checkpoints
evaluate  held-out and guard tasks through lmlab.eval.tasks, one outcome per example for the gate
"""
import dataclasses
import os

from lmlab.eval import tasks
from lmlab.finetune import chat
from lmlab.generate import Sampling
from lmlab.improve import records, scorers

STOPS = ['\n']  # answers are one line: the chat fallback ends the assistant's turn with a newline
GRPO_REWARD = 'lmlab.improve.grpo_reward:reward'  # improve.method=grpo trains on the loop's own reward


def load_model(path: str, compute_dtype: str, log=None):
  """lmlab.convert.load_model(path), run in `compute_dtype` (a GGUF file says bfloat16, which is slow on CPUs)."""
  from lmlab import convert  # pylint: disable=g-import-not-at-top
  model = convert.load_model(path, **({'log': log} if log else {}))
  return dataclasses.replace(model, config=dataclasses.replace(model.config, compute_dtype=compute_dtype))


def prompt_text(tokenizer, question: str) -> str:
  """The question as SFT renders it for training (lmlab.finetune.chat), so generation sees what training saw."""
  return chat.render(tokenizer, [{'role': 'user', 'content': question}], add_generation_prompt=True)


def generate(model, pool: list[dict], k: int, temperature: float, settings: tasks.Settings, iteration: int) -> list:
  """k samples per pool row ({question, answer?}): rows with sample_id 'ITER:PROMPT:K', prompt_id 'ITER:PROMPT'."""
  prompts = [prompt_text(model.tokenizer, row['question']) for row in pool for _ in range(k)]
  texts = tasks.generate_texts(model, prompts, settings, Sampling(temperature=temperature), [STOPS] * len(prompts),
                               settings.seed)
  samples = []
  for p, row in enumerate(pool):
    for j in range(k):
      samples.append({'sample_id': f'{iteration}:{p}:{j}', 'prompt_id': f'{iteration}:{p}', 'question': row['question'],
                      'answer': row.get('answer'), 'prompt': prompts[p * k + j], 'text': texts[p * k + j].strip()})
  return samples


def train_config(config, data_dir: str, init_from: str, steps: int, seed: int, task: str = 'sft'):
  """The fine-tuning config of one train stage on DATA_DIR/{train,validation}.jsonl: finetune.method's fine-tuning
  (full from scratch); GRPO samples improve.max_new_tokens tokens and is rewarded by the loop's scorers."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.finetune.task, c.finetune.export = task, False
    c.finetune.method = c.finetune.method if init_from else 'full'  # no pretrained weights to adapt
    if task == 'grpo':
      c.grpo.rewards, c.grpo.max_new_tokens = GRPO_REWARD, c.improve.max_new_tokens
    c.finetune.dataset = f'files:{os.path.join(data_dir, "{split}.jsonl")}'
    c.init_from, c.steps, c.seed = init_from, steps, seed
    c.checkpoint_every, c.keep_checkpoints, c.eval_every = steps, 1, 0
    c.warmup_steps = min(c.warmup_steps, max(steps // 10, 1))
  return c


def write_train_data(data_dir: str, rows: list[dict], validation_rows: int = 16) -> None:
  """train.jsonl and a small validation.jsonl (its first rows: the trainer wants a validation split; the gate
  does not use its loss)."""
  if not rows:
    raise ValueError(f'no training rows for {data_dir}: every sample failed the scorers; lower improve.threshold, '
                     'raise improve.samples_per_prompt, or start from a stronger model')
  records.write_jsonl(os.path.join(data_dir, 'validation.jsonl'), rows[:validation_rows])
  records.write_jsonl(os.path.join(data_dir, 'train.jsonl'), rows)


def train(config, data_dir: str, model_dir: str, init_from: str, steps: int, seed: int, task: str = 'sft') -> dict:
  from lmlab.finetune import trainer  # pylint: disable=g-import-not-at-top  (jax, orbax: only when training)
  summary = trainer.run(train_config(config, data_dir, init_from, steps, seed, task), model_dir)
  return {'step': summary['step'], 'steps': steps, 'init_from': init_from}


def evaluate(model, heldout: str, guard_specs: dict[str, str], settings: tasks.Settings, match: str = 'exact') -> dict:
  """{'heldout': accuracy, outcomes and accuracy per tag; 'guards': {name: the same}}, each greedy output right when
  it answers under `match` (the verifier's rule, lmlab/improve/scorers.py)."""
  out = {'model': model.source, 'heldout': _accuracy(model, heldout, settings, match), 'guards': {}}
  for name, spec in guard_specs.items():
    out['guards'][name] = _accuracy(model, spec, settings, match)
  return out


def _accuracy(model, spec: str, settings: tasks.Settings, match: str) -> dict:
  results, samples = tasks.evaluate_task(model, spec, settings)
  outcomes = [scorers.correct(s['output'], s['answer'], match) for s in samples]
  by_tag = {}
  for s, o in zip(samples, outcomes):
    for tag in s['tags']:
      by_tag.setdefault(tag, []).append(o)
  return {'task': spec, 'fingerprint': results['fingerprint'], 'accuracy': sum(outcomes) / len(outcomes),
          'by_tag': {t: sum(v) / len(v) for t, v in sorted(by_tag.items())}, 'outcomes': outcomes,
          'outputs': [s['output'] for s in samples]}
