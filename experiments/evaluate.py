"""Evaluate a model: perplexity of a text file and/or task files, optionally against a second model.

python -m experiments.evaluate --pretrained=PATH [--text_file=F] [--task=mc:F.jsonl --task=gen:F.jsonl
--task=ppl:F.jsonl ...] [--compare=OTHER] --output_json=OUT [--samples_jsonl=S] [--num_samples=N --temperature=T]

--text_file keeps its sliding-window perplexity keys (loss, perplexity, tokens, bits_per_byte) at the top level;
tasks add 'tasks' (and 'compare' with --compare) and write report.md beside --output_json (lmlab/eval/tasks.py
describes the task files).
"""
import json
import os
import sys
import time

from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).', required=True)
_TEXT_FILE = flags.DEFINE_string('text_file', None, 'UTF-8 text, scored as one document (sliding window).')
_TASK = flags.DEFINE_multi_string('task', None, 'mc:FILE.jsonl, gen:FILE.jsonl or ppl:FILE.jsonl; repeatable.')
_COMPARE = flags.DEFINE_string('compare', None, 'A second model (any --pretrained form) run on the same tasks; '
                               'differences get a paired bootstrap interval and McNemar\'s p.')
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Where the metrics JSON goes (also printed); report.md and '
                                   'its plots go beside it.')
_SAMPLES = flags.DEFINE_string('samples_jsonl', None, 'One row per task example (and model) goes here.')
_WINDOW = flags.DEFINE_integer('window', 1024, 'Tokens per forward pass (capped at the text length).')
_STRIDE = flags.DEFINE_integer('stride', 0, 'Tokens between window starts; 0: window // 2.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Windows, scoring rows or prompts per forward pass.')
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Longest scored input in tokens (left-truncated); 0: the model\'s.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'gen: tasks: tokens generated per prompt at most.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'gen: tasks: sampled outputs per prompt for pass@k (>1).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'gen: tasks: temperature of those samples.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling and bootstrap seed.')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Activation dtype.')
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def main(argv):
  del argv
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.eval import perplexity, report, tasks  # pylint: disable=g-import-not-at-top
  if not _TEXT_FILE.value and not _TASK.value:
    raise ValueError('nothing to evaluate: pass --text_file=F and/or --task=mc:F.jsonl (gen:, ppl:)')
  if _COMPARE.value and not _TASK.value:
    raise ValueError('--compare runs the --task files on both models; pass at least one --task')
  if _TEXT_FILE.value and not os.path.exists(_TEXT_FILE.value):
    raise ValueError(f'--text_file={_TEXT_FILE.value} does not exist')
  specs = [tasks.parse_task(t) for t in _TASK.value or []]
  for spec in specs:  # every row checked before a model is loaded
    tasks.read_rows(spec)

  def load(path):
    model = convert.load_model(path, verify=_VERIFY.value)
    if model.tokenizer is None:
      raise ValueError(f'{model.source} has no tokenizer to encode text with')
    return dataclasses.replace(model, config=dataclasses.replace(model.config, compute_dtype=_DTYPE.value))

  model = load(_PRETRAINED.value)
  result = {}
  if _TEXT_FILE.value:
    with open(_TEXT_FILE.value, encoding='utf-8') as f:
      text = f.read()
    start = time.time()

    def progress(done, total):
      if total > 1:
        print(f'\rwindows {done}/{total} ({time.time() - start:.0f}s)', end='\n' if done == total else '',
              file=sys.stderr, flush=True)

    result = perplexity.evaluate_texts(model.config, model.params, model.tokenizer, [text], _WINDOW.value,
                                       _STRIDE.value or None, _BATCH.value, progress, model.model_state)
    result.update(text_file=_TEXT_FILE.value)
  if specs:
    settings = tasks.Settings(batch_size=_BATCH.value, max_len=_MAX_LEN.value or None,
                              max_new_tokens=_MAX_NEW.value, num_samples=_NUM_SAMPLES.value,
                              temperature=_TEMPERATURE.value, seed=_SEED.value)
    report_md = os.path.join(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), 'report.md') \
        if _OUTPUT_JSON.value else None
    other = load(_COMPARE.value) if _COMPARE.value else None
    result.update(report.evaluate_to_files(model, specs, settings, _SAMPLES.value, report_md, other))
  result.update(pretrained=_PRETRAINED.value, model=model.source, compute_dtype=_DTYPE.value)
  if _OUTPUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
    with open(_OUTPUT_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main)
