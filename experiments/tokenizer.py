"""Train a byte-level BPE tokenizer on a config's train split:
python -m experiments.tokenizer --config=experiments/configs/dense_tiny.py --vocab_size=1024 --out=DIR
then train with --config.data.tokenizer=hf:DIR/tokenizer.json --config.model.vocab_size=1024."""
from absl import flags

from experiments import cli

_CONFIG = cli.define_config_flag('experiments/configs/dense_tiny.py')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 1024, 'Ids in the vocabulary, the 256 bytes and 2 specials included.')
_OUT = flags.DEFINE_string('out', None, 'Directory that receives tokenizer.json.', required=True)
_MAX_BYTES = flags.DEFINE_integer('max_bytes', 64 << 20, 'Text read from the train split, at most.')


def main(argv):
  del argv
  from lmlab.data import tokenizers  # pylint: disable=g-import-not-at-top  (after flags parse, like train.py)
  path = tokenizers.train_bpe(_CONFIG.value.data, _VOCAB_SIZE.value, _OUT.value, _MAX_BYTES.value)
  tokenizer = tokenizers.HFTokenizer.from_file_with_specials(path)
  print(f'wrote {path}: {tokenizer.vocab_size} ids, eos {tokenizer.eos_id}, pad {tokenizer.pad_id}; train with '
        f'--config.data.tokenizer=hf:{path} --config.model.vocab_size={tokenizer.vocab_size}')


if __name__ == '__main__':
  cli.run(main)
