"""Convert a model: python -m experiments.convert --pretrained=PATH --to=hf|orbax --out=DIR.

PATH is anything lmlab.convert.load_model reads: a Hugging Face directory (config.json + safetensors), a
llama-family .gguf file, an lmlab Orbax export, or a run's workdir (WORKDIR, WORKDIR@best, WORKDIR@STEP).
--to=hf writes a directory transformers loads (models with model state, such as a sigmoid_bias MoE's router
biases, have no Hugging Face form); --to=orbax one that `--config.init_from=DIR` and every `--pretrained` read.
"""
from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).', required=True)
_TO = flags.DEFINE_enum('to', 'orbax', ['hf', 'orbax'], 'Output format.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def main(argv):
  del argv
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.convert import mapping  # pylint: disable=g-import-not-at-top
  model = convert.export(_PRETRAINED.value, _TO.value, _OUT.value, verify=_VERIFY.value)
  config, tokenizer = model.config, model.tokenizer
  count = sum(v.size for v in mapping.flatten(model.params).values())
  state = f', model state {", ".join(sorted(model.model_state))}' if model.model_state else ''
  print(f'done: {config.family} {config.num_layers} layers, d_model {config.d_model}, {count / 1e6:.1f}M params'
        f'{state}, tokenizer {"none" if tokenizer is None else tokenizer.name}; wrote {_TO.value} to {_OUT.value}')


if __name__ == '__main__':
  cli.run(main)
