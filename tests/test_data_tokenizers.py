"""Tokenizers: round trips, special ids, bytes per token, config specs and the BPE trainer."""
import os

import pytest

from experiments.configs.base import get_base_config
from lmlab.data import make_batches, sources, tokenizers

TEXT = 'def héllo(wörld):\n    return "naïve ☃"  # done\n'


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A few stdlib modules as a .txt corpus, one document per file."""
  root, stdlib = tmp_path_factory.mktemp('corpus'), sources.StdlibSource('train', 0.0)
  for name in ('json/decoder.py', 'textwrap.py', 'glob.py', 'shlex.py'):
    (root / name.replace('/', '_').replace('.py', '.txt')).write_text(stdlib[stdlib.paths.index(name)] + TEXT)
  return root


def _data_config(corpus, **overrides):
  c = get_base_config().data
  c.update({'source': f'files:{corpus}/*.txt', 'validation_fraction': 0.0, **overrides})
  return c


def _check_bytes_per_token(tokenizer, text, extra=0):
  lengths = tokenizer.token_bytes()
  assert lengths.shape == (tokenizer.vocab_size,) and lengths[tokenizer.eos_id] == 0
  assert lengths[tokenizer.encode(text)].sum() == len(text.encode('utf-8')) + extra


def test_bytes_round_trip():
  tokenizer = tokenizers.tokenizer_from_config(get_base_config().data)
  assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
  _check_bytes_per_token(tokenizer, TEXT)


def test_trained_bpe_round_trip_and_reload(corpus, tmp_path):
  path = tokenizers.train_bpe(_data_config(corpus), 300, str(tmp_path))
  tokenizer = tokenizers.tokenizer_from_config(_data_config(corpus, tokenizer=f'hf:{path}'))
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id) == (300, 0, 1)
  ids = tokenizer.encode(TEXT)
  assert tokenizer.decode(ids) == TEXT and len(ids) < len(TEXT.encode())
  _check_bytes_per_token(tokenizer, TEXT)


def test_bpe_spec_trains_into_workdir_once(corpus, tmp_path):
  c = _data_config(corpus, tokenizer='bpe:290')
  first = tokenizers.tokenizer_from_config(c, str(tmp_path))
  stamp = os.path.getmtime(tmp_path / 'tokenizer.json')
  again = tokenizers.tokenizer_from_config(c, str(tmp_path))
  assert os.path.getmtime(tmp_path / 'tokenizer.json') == stamp
  assert first.encode(TEXT) == again.encode(TEXT) and again.vocab_size == 290
  c.tokenizer = 'bpe:400'
  with pytest.raises(ValueError, match='has 290 ids'):
    tokenizers.tokenizer_from_config(c, str(tmp_path))
  with pytest.raises(ValueError, match='workdir'):
    tokenizers.tokenizer_from_config(c)


def test_sentencepiece_round_trip(corpus, tmp_path):
  spm = pytest.importorskip('sentencepiece')
  spm.SentencePieceTrainer.train(
      input=[str(p) for p in sorted(corpus.iterdir())], model_prefix=str(tmp_path / 'm'), vocab_size=400,
      model_type='bpe', byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  tokenizer = tokenizers.tokenizer_from_config(_data_config(corpus, tokenizer=f'spm:{tmp_path}/m.model'))
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (400, 0, 1, None)
  assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
  _check_bytes_per_token(tokenizer, TEXT, extra=1)  # SentencePiece's dummy-prefix space.
  batch = next(make_batches(_data_config(corpus, tokenizer=f'spm:{tmp_path}/m.model'), tokenizer, split='train',
                            global_batch_size=2, seq_len=64, seed=0, process_index=0, process_count=1))
  assert batch['inputs'].max() < 400 and batch['weights'].sum() > 0


def test_hf_without_eos_is_an_error(tmp_path):
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  Tokenizer(models.WordLevel({'a': 0, '[UNK]': 1}, unk_token='[UNK]')).save(str(tmp_path / 't.json'))
  with pytest.raises(ValueError, match='none of the EOS tokens'):
    tokenizers.tokenizer_from_config(_data_config(tmp_path, tokenizer=f'hf:{tmp_path}/t.json'))


@pytest.mark.parametrize('spec, message', [
    ('gpt9', 'unknown data.tokenizer'), ('hf:/no/such/tokenizer.json', 'does not exist'),
    ('spm:/no/such.model', 'does not exist'), ('bpe:lots', 'unknown data.tokenizer')])
def test_bad_tokenizer_specs(spec, message):
  c = get_base_config().data
  c.tokenizer = spec
  with pytest.raises(ValueError, match=message):
    tokenizers.tokenizer_from_config(c, '/tmp')


def test_check_vocab_names_the_fix():
  tokenizers.check_vocab(259, tokenizers.ByteTokenizer())
  with pytest.raises(ValueError, match='vocab_size=259'):
    tokenizers.check_vocab(100, tokenizers.ByteTokenizer())


def test_batches_with_bpe_tokens_stay_in_vocab(corpus, tmp_path):
  c = _data_config(corpus, tokenizer=f'hf:{tokenizers.train_bpe(_data_config(corpus), 280, str(tmp_path))}')
  tokenizer = tokenizers.tokenizer_from_config(c)
  batch = next(make_batches(c, tokenizer, split='train', global_batch_size=4, seq_len=32, seed=0,
                            process_index=0, process_count=1))
  assert batch['inputs'].max() < 280 and batch['weights'].sum() > 0
  assert not batch['weights'][batch['inputs'] == tokenizer.eos_id].any()


def test_bytes_decode_skips_ids_past_the_bytes():
  """A model's vocabulary may be padded past the tokenizer's 259 ids (dense_tiny has 384): such ids are not text."""
  tokenizer = tokenizers.ByteTokenizer()
  assert tokenizer.decode([3 + ord('a'), 1, 300, 3 + ord('b')]) == 'ab'
