"""`run(config, workdir)`: the self-improvement loop, resumable stage by stage.

DIR/config.json        the resolved config and its fingerprint; a rerun with another config is refused
DIR/tasks/             the frozen held-out and guard tasks (gen: JSONL), written once
DIR/base/              train.jsonl, model/ (a fine-tuning workdir) and eval.json of the starting model; with
                       config.init_from the starting model is that pretrained model and base/ holds only eval.json
DIR/iterations/<i>/    samples.jsonl, scores.jsonl, train.jsonl (+ validation.jsonl: SFT rows, DPO pairs or
                       GRPO's prompts), model/, trained.json, eval.json, decision.json
DIR/lineage.json, DIR/progress.png
Every stage writes its output atomically and is skipped when that output exists; every draw is seeded; so a run
killed anywhere and started again with the same command ends with the same files as one never interrupted.
With improve.pause_for_review the run stops (Paused) after each round's generate stage, so people can judge the
samples (experiments.review) before the score stage reads DIR/feedback; the same command then continues.
`hook(stage, iteration)`, when given, is called before each stage that runs (and at 'trained', after training
and before its marker is written): tests raise from it to simulate a kill.
"""
import functools
import hashlib
import json
import os
import time
from typing import Callable

from lmlab.eval import tasks
from lmlab.improve import addition, feedback, gate, lineage, records, scorers, select, stages

METHODS = ('sft', 'dpo', 'grpo')
BASE = 'base/model'  # the starting model's name in decisions and lineage (config.init_from when that is set)
TRAIN_FROM = ('current', 'base')
# Changing these must not invalidate a run: more iterations resume, and pausing for review changes no output.
UNFINGERPRINTED = ('progress', 'improve.iterations', 'improve.pause_for_review')


class Paused(Exception):
  """The loop stopped after generating a round's samples so that people can review them; rerun to continue."""


def fingerprint(config) -> str:
  """sha256 of the config's JSON without the keys that do not change results."""
  values = json.loads(config.to_json_best_effort(sort_keys=True))
  for key in UNFINGERPRINTED:
    *path, last = key.split('.')
    target = values
    for name in path:
      target = target[name]
    target.pop(last, None)
  return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


class Loop:
  """One workdir's loop: paths, the current model, and the stages of each iteration."""

  def __init__(self, config, workdir: str, hook: Callable[[str, int], None] | None = None,
               log: Callable[[str], None] = print):
    self.started = time.time()
    self.config, self.improve, self.workdir, self.log = config, config.improve, os.path.abspath(workdir), log
    self.hook = hook or (lambda stage, iteration: None)
    self._check_config()
    self.fingerprint = fingerprint(config)
    self.scoring = scorers.settings(config)
    self.rules = scorers.rules_of(self.scoring)
    self._check_scorers()
    self.settings = tasks.Settings(batch_size=self.improve.batch_size, max_new_tokens=self.improve.max_new_tokens,
                                   seed=config.seed, n_boot=self.improve.n_boot)
    self._models = {}

  def _check_config(self) -> None:
    i = self.improve
    if i.method not in METHODS:
      raise ValueError(f'improve.method={i.method!r} is not one of {", ".join(METHODS)}')
    if i.train_from not in TRAIN_FROM:
      raise ValueError(f'improve.train_from={i.train_from!r} is not one of {", ".join(TRAIN_FROM)}')
    if i.base_digits < 1 or i.iterations < 0 or i.samples_per_prompt < 1 or i.pool_size < 1:
      raise ValueError('improve.base_digits, samples_per_prompt and pool_size must be at least 1 and iterations at '
                       'least 0')
    if i.notation not in addition.NOTATIONS:
      raise ValueError(f'improve.notation={i.notation!r} is not one of {", ".join(addition.NOTATIONS)}')
    if i.notation == 'plain' and i.pad_to:
      raise ValueError(f'improve.pad_to={i.pad_to} pads reversed operands; set improve.pad_to=0 for notation=plain')
    if '{a}' not in i.question or '{b}' not in i.question:
      raise ValueError(f'improve.question={i.question!r} must place both operands: put {{a}} and {{b}} in it')
    if i.pad_to and i.pad_to < i.base_digits + max(i.iterations, 1):
      raise ValueError(f'improve.pad_to={i.pad_to} is shorter than the longest problem, base_digits + iterations = '
                       f'{i.base_digits + max(i.iterations, 1)}; raise it or set 0 (no padding)')

  def _check_scorers(self) -> None:
    i = self.improve
    if i.method == 'grpo' and 'majority' in self.rules.names:
      raise ValueError('improve.method=grpo scores each completion on its own while it trains, and the majority vote '
                       'needs the prompt\'s other samples: drop majority from improve.scorers (e.g. verifier)')
    if i.method == 'sft' and self.rules.graded and i.threshold >= 1:
      raise ValueError(f'improve.threshold={i.threshold} keeps only samples whose graded score '
                       f'({", ".join(self.rules.graded)}) is 1, which a probability hardly reaches; set it below 1')

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def stage(self, name: str, iteration: int, output: str, make: Callable[[], None]) -> None:
    """Runs `make` (which writes `output` atomically) unless `output` exists."""
    if os.path.exists(output):
      return
    self.hook(name, iteration)
    self.log(f'[{time.time() - self.started:7.1f}s] iteration {iteration}: {name}')
    make()

  @property
  def pretrained(self) -> bool:
    """Whether the loop starts from config.init_from (a pretrained model) rather than training its own base."""
    return bool(self.config.init_from)

  def model_path(self, rel: str) -> str:
    """Where a model named in decisions lives: a fine-tuning workdir relative to DIR, or config.init_from."""
    return self.config.init_from if rel == BASE and self.pretrained else self.path(rel)

  def load(self, path: str):
    """The model at `path`, loaded once (the base and a judge may be one file), run in config.model.compute_dtype."""
    if path not in self._models:
      self._models[path] = stages.load_model(path, self.config.model.compute_dtype, self.log)
    return self._models[path]

  def model(self, rel: str):
    """The model named `rel` in decisions (see model_path)."""
    return self.load(self.model_path(rel))

  @functools.cached_property
  def scorer_models(self) -> tuple:
    """(rules, judge, reward model), loaded when a round is first scored."""
    return scorers.build(self.scoring, self.load)

  # --- setup ---------------------------------------------------------------------------------------------------

  def _config_file(self) -> None:
    path = self.path('config.json')
    if os.path.exists(path):
      stored = records.read_json(path)['fingerprint']
      if stored != self.fingerprint:
        raise ValueError(f'{self.workdir} was run with another config (fingerprint {stored[:12]}, now '
                         f'{self.fingerprint[:12]}); rerun with the same flags or use a new --workdir')
      return
    records.write_json(path, {'fingerprint': self.fingerprint, 'config': json.loads(self.config.to_json_best_effort())})

  def digits(self, iteration: int) -> int:
    """Iteration i labels problems one digit longer than iteration i-1 did, starting one past the base's."""
    return self.improve.base_digits + iteration

  def _tasks(self) -> None:
    """held-out (base_digits+1 .. base_digits+iterations digits) and guard (1 .. base_digits) gen: tasks."""
    i = self.improve
    tokenizer = None

    def write(name, digit_counts, seed):
      nonlocal tokenizer
      if tokenizer is None and self.pretrained:
        tokenizer = self.model(BASE).tokenizer
      elif tokenizer is None:
        from lmlab.data import tokenizers  # pylint: disable=g-import-not-at-top
        tokenizer = tokenizers.tokenizer_from_config(self.config.data)
      rows = [{'prompt': stages.prompt_text(tokenizer, r['prompt']), 'answer': r['answer'], 'until': stages.STOPS,
               'tags': [f'digits={r["digits"]}']} for r in self.problems(digit_counts, i.eval_examples, seed)]
      records.write_jsonl(self.path('tasks', name), rows)

    top = i.base_digits + max(i.iterations, 1)
    for name, counts, seed in (('heldout.jsonl', list(range(i.base_digits + 1, top + 1)), 1),
                               ('guard.jsonl', list(range(1, i.base_digits + 1)), 2)):
      self.stage(f'task {name}', 0, self.path('tasks', name), lambda n=name, c=counts, s=seed: write(n, c, s))

  def problems(self, digit_counts: list[int], n: int, seed: int) -> list[dict]:
    i = self.improve
    return addition.problems(digit_counts, n, seed, i.pad_to, i.notation, i.question)

  def heldout_questions(self) -> set[str]:
    return {r['prompt'] for r in records.read_jsonl(self.path('tasks', 'heldout.jsonl'))}

  def evaluate(self, model_rel: str, out: str) -> None:
    guards = {'in_distribution_accuracy': f'gen:{self.path("tasks", "guard.jsonl")}'}
    result = stages.evaluate(self.model(model_rel), f'gen:{self.path("tasks", "heldout.jsonl")}', guards,
                             self.settings, self.improve.match)
    records.write_json(out, result)

  def _base(self) -> None:
    """The model the loop starts from: config.init_from, or supervised training on correct additions of
    1 .. base_digits digits."""
    i = self.improve
    base = self.path('base')

    def data():
      rows = [{'prompt': r['prompt'], 'response': r['answer']}
              for r in self.problems(list(range(1, i.base_digits + 1)), i.base_examples, self.config.seed)]
      stages.write_train_data(base, rows)

    if not self.pretrained:
      self.stage('base data', 0, os.path.join(base, 'train.jsonl'), data)
      self._train(0, base, '', i.base_steps, 'sft')
    self.stage('base evaluate', 0, os.path.join(base, 'eval.json'),
               lambda: self.evaluate(BASE, os.path.join(base, 'eval.json')))

  def _train(self, iteration: int, directory: str, init_from: str, steps: int, task: str) -> None:
    marker = os.path.join(directory, 'trained.json')

    def make():
      summary = stages.train(self.config, directory, os.path.join(directory, 'model'), init_from, steps,
                             self.config.seed + iteration, task)
      self.hook('trained', iteration)
      records.write_json(marker, summary)

    self.stage('train', iteration, marker, make)

  # --- one iteration -------------------------------------------------------------------------------------------

  def iteration(self, it: int, current: str, decisions: list[dict]) -> dict:
    i, d = self.improve, self.path('iterations', str(it))
    samples_path, scores_path = os.path.join(d, 'samples.jsonl'), os.path.join(d, 'scores.jsonl')
    exclude = self.heldout_questions()

    def generate():
      pool = [{'question': r['prompt'], 'answer': r['answer']}
              for r in self.problems([self.digits(it)], i.pool_size + len(exclude), self.config.seed + 1000 * it)
              if stages.prompt_text(self.model(current).tokenizer, r['prompt']) not in exclude][:i.pool_size]
      settings = tasks.Settings(batch_size=i.batch_size, max_new_tokens=i.max_new_tokens,
                                seed=self.config.seed + 1000 * it)
      records.write_jsonl(samples_path, stages.generate(self.model(current), pool, i.samples_per_prompt,
                                                        i.temperature, settings, it))

    self.stage('generate', it, samples_path, generate)
    samples = records.read_jsonl(samples_path)
    review = os.path.join(d, 'review.json')
    if i.pause_for_review and not os.path.exists(review) and not os.path.exists(scores_path):  # once per round
      records.write_json(review, {'samples': len(samples)})
      raise Paused(f'round {it}: {len(samples)} samples in {samples_path}; review them (python -m experiments.review '
                   f'--workdir={self.workdir}), then rerun the same command to continue')

    def score():
      automated = scorers.score(samples, *self.scorer_models)
      judged = feedback.apply(automated, feedback.load(self.path('feedback')))
      records.write_jsonl(scores_path, judged)

    self.stage('score', it, scores_path, score)
    scores = records.read_jsonl(scores_path)
    self.stage('select', it, os.path.join(d, 'train.jsonl'), lambda: self._select(it, d, samples, scores, decisions))
    init_from = self.model_path(current if i.train_from == 'current' else BASE)
    self._train(it, d, init_from, i.steps, i.method)
    candidate = f'iterations/{it}/model'
    self.stage('evaluate', it, os.path.join(d, 'eval.json'),
               lambda: self.evaluate(candidate, os.path.join(d, 'eval.json')))
    decision_path = os.path.join(d, 'decision.json')
    self.stage('gate', it, decision_path, lambda: records.write_json(
        decision_path, self._decide(it, current, candidate, samples, scores)))
    return records.read_json(decision_path)

  def _select(self, it: int, d: str, samples: list[dict], scores: list[dict], decisions: list[dict]) -> None:
    i = self.improve
    if i.method == 'grpo':  # GRPO samples and scores its own completions of the round's prompts
      rows = select.prompts(samples, self.scoring)
    elif i.method == 'dpo':
      rows = select.preference_pairs(samples, scores, i.dpo_margin)
      rows += feedback.preferences_as_pairs(self.path('feedback'), samples)
    else:
      rows = select.rejection(samples, scores, i.threshold, i.max_per_prompt)
      rows += feedback.corrections_as_sft(self.path('feedback'), samples)
      previous = self.path(os.path.dirname(decisions_current(decisions)), 'train.jsonl')
      if i.accumulate and os.path.exists(previous):
        # the paper's recipe: the current model's data (base data + accepted rounds; a pretrained base has none)
        # plus this round's
        rows = records.read_jsonl(previous) + rows
    stages.write_train_data(d, rows)

  def _decide(self, it: int, current: str, candidate: str, samples: list[dict], scores: list[dict]) -> dict:
    i = self.improve
    now = records.read_json(self.path(os.path.dirname(current), 'eval.json'))
    new = records.read_json(self.path(os.path.dirname(candidate), 'eval.json'))
    guards = [gate.Guard(name, now['guards'][name]['accuracy'], g['accuracy'], i.guard_tolerance)
              for name, g in sorted(new['guards'].items())]
    decision = gate.decide(new['heldout']['outcomes'], now['heldout']['outcomes'], guards, n_boot=i.n_boot,
                           seed=self.config.seed + it, confidence=i.confidence)
    answers = {s['sample_id']: s.get('answer') for s in samples}
    kept = [r for r in records.read_jsonl(self.path('iterations', str(it), 'train.jsonl'))
            if r.get('sample_id', '').startswith(f'{it}:') and 'response' in r]
    label_accuracy = (sum(scorers.correct(r['response'], answers[r['sample_id']] or '', i.match) for r in kept) /
                      len(kept) if kept and all(answers[r['sample_id']] is not None for r in kept) else None)
    return {'iteration': it, **decision, 'fingerprint': self.fingerprint, 'candidate': candidate, 'current': current,
            'candidate_heldout': new['heldout']['accuracy'], 'current_heldout': now['heldout']['accuracy'],
            'candidate_by_tag': new['heldout']['by_tag'], 'current_by_tag': now['heldout']['by_tag'],
            'mean_reward': sum(s['reward'] for s in scores) / len(scores), 'selected': len(kept),
            'selected_label_accuracy': label_accuracy,
            'human_agreement': feedback.agreement(scores, feedback.load(self.path('feedback')).preferences)}

  # --- the whole run -------------------------------------------------------------------------------------------

  def run(self) -> dict:
    self._config_file()
    self._tasks()
    self._base()
    base_eval = records.read_json(self.path('base', 'eval.json'))
    base = {'iteration': 0, 'model': BASE, 'heldout': base_eval['heldout']['accuracy'],
            **({'init_from': self.config.init_from} if self.pretrained else {})}
    decisions = []
    for it in range(1, self.improve.iterations + 1):
      decision = self.iteration(it, decisions_current(decisions), decisions)
      decisions.append(decision)
      verdict = 'accepted' if decision['accepted'] else 'rejected: ' + '; '.join(decision['reasons'])
      self.log(f'iteration {it}: held-out {decision["current_heldout"]:.3f} -> {decision["candidate_heldout"]:.3f} '
               f'({verdict})')
    return {'base': base, 'decisions': decisions, 'lineage': lineage.write(self.workdir, base, decisions),
            'current': decisions_current(decisions)}


def decisions_current(decisions: list[dict]) -> str:
  """The model the next iteration starts from: the last accepted candidate, else the base."""
  accepted = [d['candidate'] for d in decisions if d['accepted']]
  return accepted[-1] if accepted else BASE


def run(config, workdir: str, hook: Callable[[str, int], None] | None = None,
        log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the loop; returns {'base', 'decisions', 'lineage', 'current'}."""
  return Loop(config, workdir, hook, log).run()
