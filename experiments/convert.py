"""Convert pretrained weights: python -m experiments.convert --pretrained=PATH --to=hf|orbax --out=DIR.

PATH is a Hugging Face directory (config.json + safetensors), a llama-family .gguf file, or an lmlab
Orbax export. --to=hf writes a directory transformers loads; --to=orbax one that
`--config.init_from=DIR` and `lmlab.convert.load_orbax` read.
"""
from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file or lmlab Orbax export.', required=True)
_TO = flags.DEFINE_enum('to', 'orbax', ['hf', 'orbax'], 'Output format.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.', required=True)


def main(argv):
  del argv
  from lmlab import convert  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.convert import mapping  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = convert.load_pretrained(_PRETRAINED.value)
  convert.save(_OUT.value, _TO.value, config, params, tokenizer, source=_PRETRAINED.value)
  count = sum(v.size for v in mapping.flatten(params).values())
  print(f'done: {config.family} {config.num_layers} layers, d_model {config.d_model}, {count / 1e6:.1f}M params, '
        f'tokenizer {"none" if tokenizer is None else tokenizer.name}; wrote {_TO.value} to {_OUT.value}')


if __name__ == '__main__':
  cli.run(main)
