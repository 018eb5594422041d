"""Interpret one input with a pretrained model:
python -m experiments.interpret --pretrained=PATH --text=TEXT [--corrupt_text=TEXT] [--target=TOKEN | --label=N]
    --methods=attention,rollout,grad_x_input,integrated_gradients,occlusion,logit_lens,patching,routing
    --output_dir=OUT [--ig_steps=64]
writes OUT/report.html (self-contained), one PNG per view, OUT/attention.npy and OUT/interpret.json.
"""
from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).', required=True)
_TEXT = flags.DEFINE_string('text', None, 'The input to interpret.', required=True)
_CORRUPT = flags.DEFINE_string('corrupt_text', None, 'A corrupted input with as many tokens, for patching.')
_TARGET = flags.DEFINE_string('target', None, 'The next token whose log-probability is explained; default: the '
                              'model\'s prediction.')
_LABEL = flags.DEFINE_integer('label', None, 'For a fine-tuned classifier: the class whose logit is explained; '
                              'default: its prediction.')
_METHODS = flags.DEFINE_string('methods', 'attention,rollout,grad_x_input,integrated_gradients,occlusion,logit_lens',
                               'Comma-separated views (see lmlab/interpret/pipeline.py METHODS).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the report and the files go.', required=True)
_IG_STEPS = flags.DEFINE_integer('ig_steps', 64, 'Integrated-gradients quadrature points (one vmapped call).')
_IG_RULE = flags.DEFINE_enum('ig_rule', 'gauss_legendre', ['gauss_legendre', 'riemann'], 'IG quadrature rule.')
_BASELINE = flags.DEFINE_enum('baseline', 'pad', ['zero', 'pad'], 'IG / occlusion reference embedding.')
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def main(argv):
  del argv
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.interpret import pipeline  # pylint: disable=g-import-not-at-top
  methods = pipeline.parse_methods(_METHODS.value)
  model = convert.load_model(_PRETRAINED.value, verify=_VERIFY.value)
  result = pipeline.interpret(model, _TEXT.value, _OUTPUT_DIR.value, methods, _CORRUPT.value, _TARGET.value,
                              _LABEL.value, _IG_STEPS.value, _IG_RULE.value, _BASELINE.value)
  print(f'prediction {result["prediction_name"]!r}, target {result["target_name"]!r}; '
        f'report: {_OUTPUT_DIR.value}/report.html')


if __name__ == '__main__':
  cli.run(main)
