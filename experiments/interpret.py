"""Interpret inputs with a pretrained model or a run's checkpoint:
python -m experiments.interpret --pretrained=PATH | --workdir=DIR --text=TEXT | --text_file=F [--corrupt_text=TEXT]
    [--target=TOKEN | --label=N]
    --methods=attention,rollout,grad_x_input,integrated_gradients,occlusion,logit_lens,patching,routing
    --output_dir=OUT [--ig_steps=64]
--text writes OUT/report.html (self-contained), one PNG per view, OUT/attention.npy and OUT/interpret.json.
--text_file (one input per line, blank lines skipped) explains every input in one padded batch, each method compiled
once: OUT/report.html with a section per input, OUT/interpret.json {"inputs": [...]}, OUT/attention.npy of the
first input, PNGs named inputK_*.png (lmlab/interpret/pipeline.py).
"""
import os
import time

from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training or fine-tuning run\'s directory instead of --pretrained: '
                               'its latest intact checkpoint (DIR@best, DIR@STEP pick another).')
_TEXT = flags.DEFINE_string('text', None, 'The input to interpret.')
_TEXT_FILE = flags.DEFINE_string('text_file', None, 'Instead of --text: a UTF-8 file of inputs, one per line (blank '
                                 'lines skipped), explained as one batch.')
_CORRUPT = flags.DEFINE_string('corrupt_text', None, 'A corrupted --text with as many tokens, for patching.')
_TARGET = flags.DEFINE_string('target', None, 'The next token whose log-probability is explained; default: the '
                              'model\'s prediction for each input.')
_LABEL = flags.DEFINE_integer('label', None, 'For a fine-tuned classifier: the class whose logit is explained; '
                              'default: its prediction for each input.')
_METHODS = flags.DEFINE_string('methods', 'attention,rollout,grad_x_input,integrated_gradients,occlusion,logit_lens',
                               'Comma-separated views (see lmlab/interpret/pipeline.py METHODS).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the report and the files go.', required=True)
_IG_STEPS = flags.DEFINE_integer('ig_steps', 64, 'Integrated-gradients quadrature points (one vmapped call).')
_IG_RULE = flags.DEFINE_enum('ig_rule', 'gauss_legendre', ['gauss_legendre', 'riemann'], 'IG quadrature rule.')
_BASELINE = flags.DEFINE_enum('baseline', 'pad', ['zero', 'pad'], 'IG / occlusion reference embedding.')
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def _model_path() -> str:
  """What load_model reads: --pretrained, or --workdir after checking it is a run's directory."""
  if (_PRETRAINED.value is None) == (_WORKDIR.value is None):
    raise ValueError('pass exactly one of --pretrained=PATH and --workdir=DIR')
  if _PRETRAINED.value is not None:
    return _PRETRAINED.value
  workdir = _WORKDIR.value
  run = workdir if os.path.isdir(workdir) or '@' not in workdir else workdir.rpartition('@')[0]
  if not os.path.isdir(os.path.join(run, 'checkpoints')):
    raise ValueError(f'--workdir={workdir}: {run} is not a training or fine-tuning run (it has no checkpoints/); '
                     'pass an export, a Hugging Face directory or a .gguf file with --pretrained')
  return workdir


def main(argv):
  del argv
  path = _model_path()
  if (_TEXT.value is None) == (_TEXT_FILE.value is None):
    raise ValueError('pass exactly one of --text=TEXT and --text_file=FILE')
  if _TEXT_FILE.value is not None and _CORRUPT.value is not None:
    raise ValueError('--corrupt_text pairs with one --text; it cannot go with --text_file')
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.interpret import pipeline  # pylint: disable=g-import-not-at-top
  methods = pipeline.parse_methods(_METHODS.value)
  texts = None if _TEXT_FILE.value is None else pipeline.read_texts(_TEXT_FILE.value)
  model = convert.load_model(path, verify=_VERIFY.value)
  settings = dict(target=_TARGET.value, label=_LABEL.value, ig_steps=_IG_STEPS.value, ig_rule=_IG_RULE.value,
                  baseline=_BASELINE.value)
  start = time.perf_counter()
  if texts is None:
    result = pipeline.interpret(model, _TEXT.value, _OUTPUT_DIR.value, methods, _CORRUPT.value, **settings)
    done = f'prediction {result["prediction_name"]!r}, target {result["target_name"]!r}'
  else:
    pipeline.interpret_many(model, texts, _OUTPUT_DIR.value, methods, progress=True, **settings)
    done = f'{len(texts)} inputs'
  print(f'{done}; interpreted in {time.perf_counter() - start:.1f}s; report: {_OUTPUT_DIR.value}/report.html')


if __name__ == '__main__':
  cli.run(main)
