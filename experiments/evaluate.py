"""Perplexity of a pretrained model on a text file:
python -m experiments.evaluate --pretrained=PATH --text_file=F --output_json=OUT [--window=1024 --stride=512].
"""
import json
import os
import sys
import time

from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).', required=True)
_TEXT_FILE = flags.DEFINE_string('text_file', None, 'UTF-8 text, scored as one document.', required=True)
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Where the metrics JSON goes (also printed).')
_WINDOW = flags.DEFINE_integer('window', 1024, 'Tokens per forward pass (capped at the text length).')
_STRIDE = flags.DEFINE_integer('stride', 0, 'Tokens between window starts; 0: window // 2.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Windows per forward pass.')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Activation dtype.')
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def main(argv):
  del argv
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.eval import perplexity  # pylint: disable=g-import-not-at-top
  if not os.path.exists(_TEXT_FILE.value):
    raise ValueError(f'--text_file={_TEXT_FILE.value} does not exist')
  with open(_TEXT_FILE.value, encoding='utf-8') as f:
    text = f.read()
  model = convert.load_model(_PRETRAINED.value, verify=_VERIFY.value)
  if model.tokenizer is None:
    raise ValueError(f'{model.source} has no tokenizer to encode --text_file with')
  config = dataclasses.replace(model.config, compute_dtype=_DTYPE.value)
  start = time.time()

  def progress(done, total):
    if total > 1:
      print(f'\rwindows {done}/{total} ({time.time() - start:.0f}s)', end='\n' if done == total else '',
            file=sys.stderr, flush=True)

  result = perplexity.evaluate_texts(config, model.params, model.tokenizer, [text], _WINDOW.value,
                                     _STRIDE.value or None, _BATCH.value, progress, model.model_state)
  result.update(pretrained=_PRETRAINED.value, model=model.source, text_file=_TEXT_FILE.value,
                compute_dtype=_DTYPE.value)
  if _OUTPUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
    with open(_OUTPUT_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main)
