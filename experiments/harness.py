"""lm-evaluation-harness on an lmlab model: python -m experiments.harness --pretrained=PATH --tasks=A,B
[--include_path=DIR] --output_json=OUT [--num_fewshot=N --limit=N --batch_size=8].

Offline: put a task YAML in --include_path that reads a local file (`dataset_path: json` and
`dataset_kwargs: {data_files: {test: FILE.jsonl}}`). Needs the `lm-eval` package (lmlab's `eval` extra).
"""
import json
import os

from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).', required=True)
_TASKS = flags.DEFINE_list('tasks', None, 'lm-eval task names, comma separated.', required=True)
_INCLUDE = flags.DEFINE_string('include_path', None, 'Directory of extra task YAML files.')
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Where lm-eval\'s results JSON goes (also printed).')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples per prompt; default: the task\'s.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Documents per task at most (for a quick look; not a real score).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Rows per forward pass.')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Activation dtype.')
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def main(argv):
  del argv
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.eval import harness  # pylint: disable=g-import-not-at-top
  if _INCLUDE.value and not os.path.isdir(_INCLUDE.value):
    raise ValueError(f'--include_path={_INCLUDE.value} is not a directory')
  model = convert.load_model(_PRETRAINED.value, verify=_VERIFY.value)
  model = dataclasses.replace(model, config=dataclasses.replace(model.config, compute_dtype=_DTYPE.value))
  output = harness.run(model, _TASKS.value, _INCLUDE.value, _BATCH.value, _LIMIT.value, num_fewshot=_NUM_FEWSHOT.value)
  result = {'model': model.source, 'pretrained': _PRETRAINED.value, 'tasks': _TASKS.value,
            'results': output['results'], 'versions': output.get('versions'), 'n-shot': output.get('n-shot')}
  if _OUTPUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
    with open(_OUTPUT_JSON.value, 'w') as f:
      json.dump(result, f, indent=2, default=str)
  print(json.dumps(result, default=str))


if __name__ == '__main__':
  cli.run(main)
