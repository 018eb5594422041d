"""Bits per byte: per-token bytes that add up to the decoded text for every tokenizer, and eval that leaves EOS out."""
import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
import sentencepiece
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from experiments.configs.base import get_base_config
from lmlab.data import pipeline, sources, tokenizers
from lmlab.models import ModelConfig, Transformer
from lmlab.train import step

# With and without a leading space, runs of spaces and newlines, and '☃' / 'ж', which the training corpus lacks:
# SentencePiece-style vocabularies spell them with <0xNN> byte-fallback pieces, once as a text's first token.
TEXTS = ('def héllo(wörld):\n    return "naïve ☃"  # done\n', 'ж starts with a byte-fallback piece',
         ' a leading space', '  two  spaces  inside  ', '\n\nnewlines first', 'x', '☃', 'ends with a space ')
# SentencePiece-style decoders of tokenizer.json: Llama 2 (the prefix space comes from the normalizer), Mistral and
# newer Llama conversions (from a Metaspace pre-tokenizer), T5 (the Metaspace decoder, which keeps <0xNN> as text).
LLAMA_DECODER = ('Replace', 'ByteFallback', 'Fuse', 'Strip')
METASPACE_STYLES = ('llama2', 'mistral', 't5')
ROUND_TRIP = ('bytes', 'byte-level BPE', 'spm', 'llama2')  # the kinds below whose decode(encode(text)) == text


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root, stdlib = tmp_path_factory.mktemp('bpb_corpus'), sources.StdlibSource('train', 0.0)
  text = ''.join(stdlib[stdlib.paths.index(name)] for name in ('textwrap.py', 'glob.py'))
  assert '☃' not in text and 'ж' not in text
  (root / 'corpus.txt').write_text(text)
  return root


def _sentencepiece(corpus, name, **normalization):
  """A 400-piece SentencePiece BPE with byte fallback, trained on the corpus; pad 0, eos 1, unk 2, bos 3."""
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus / 'corpus.txt'), model_prefix=str(corpus / name), vocab_size=400, model_type='bpe',
      byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=3, minloglevel=2, **normalization)
  return tokenizers.SentencePieceTokenizer(str(corpus / f'{name}.model'))


def _metaspace_json(corpus, style):
  """A SentencePiece-style tokenizer.json built with `tokenizers`: BPE over '▁'-words with 256 <0xNN> pieces."""
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<unk>', '<s>', '</s>'], show_progress=False)
  words = hf_tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  words.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first')
  words.train_from_iterator([(corpus / 'corpus.txt').read_text()], trainer)
  learned = json.loads(words.to_str())['model']
  pieces = ['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)] + sorted(
      learned['vocab'], key=learned['vocab'].get)[3:]
  tok = hf_tokenizers.Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                           merges=[tuple(m) for m in learned['merges']], unk_token='<unk>',
                                           byte_fallback=True))
  llama = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                             decoders.Strip(' ', 1, 0)])
  if style == 'llama2':
    tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
    tok.decoder = llama
  elif style == 'mistral':
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=False)
    tok.decoder = llama
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')
    tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='always')
  tok.add_special_tokens(['<unk>', '<s>', '</s>'])
  path = corpus / f'{style}.json'
  tok.save(str(path))
  return tokenizers.tokenizer_from_config(_data_config(corpus, tokenizer=f'hf:{path}'))


def _data_config(corpus, **overrides):
  c = get_base_config().data
  c.update({'source': f'files:{corpus}/*.txt', 'validation_fraction': 0.0, **overrides})
  return c


@pytest.fixture(scope='module')
def make_tokenizer(corpus, tmp_path_factory):
  """kind -> tokenizer, each built once per module."""
  built = {}

  def make(kind):
    if kind not in built:
      if kind == 'bytes':
        built[kind] = tokenizers.ByteTokenizer()
      elif kind == 'byte-level BPE':
        path = tokenizers.train_bpe(_data_config(corpus), 300, str(tmp_path_factory.mktemp('bpe')))
        built[kind] = tokenizers.tokenizer_from_config(_data_config(corpus, tokenizer=f'hf:{path}'))
      elif kind == 'spm':
        built[kind] = _sentencepiece(corpus, 'spm', normalization_rule_name='identity', remove_extra_whitespaces=False)
      elif kind == 'spm nfkc':  # SentencePiece's defaults: NFKC, extra whitespace removed (texts do not round-trip)
        built[kind] = _sentencepiece(corpus, 'nfkc')
      else:
        built[kind] = _metaspace_json(corpus, kind)
    return built[kind]
  return make


@pytest.mark.parametrize('kind', ['bytes', 'byte-level BPE', 'spm', 'spm nfkc', *METASPACE_STYLES])
def test_byte_counts_add_up_to_the_decoded_text(make_tokenizer, kind):
  tokenizer = make_tokenizer(kind)
  table_V = tokenizer.token_bytes()
  for text in TEXTS:
    ids = tokenizer.encode(text)
    counts = tokenizer.byte_counts(ids)
    decoded = tokenizer.decode(ids)
    assert counts.sum() == len(decoded.encode('utf-8')), (text, decoded, counts)
    if kind in ROUND_TRIP:
      assert decoded == text and counts.sum() == len(text.encode('utf-8'))
    # The device's table is what a token adds inside a text; specials (EOS, BOS) add nothing, even at the start.
    np.testing.assert_array_equal(counts[1:], table_V[ids[1:]])
    with_specials = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids + [tokenizer.eos_id]
    assert tokenizer.byte_counts(with_specials).sum() == counts.sum() and table_V[tokenizer.eos_id] == 0


@pytest.mark.parametrize('kind', ['spm', *METASPACE_STYLES])
def test_sentencepiece_style_vocabularies_fall_back_to_bytes(make_tokenizer, kind):
  """The identity above covers byte-fallback pieces and the prefix space these tokenizers add to a text."""
  tokenizer = make_tokenizer(kind)
  piece = tokenizer.sp.id_to_piece if kind == 'spm' else tokenizer.tokenizer.id_to_token
  snowman = tokenizer.encode('☃')
  assert [piece(i) for i in snowman[-3:]] == ['<0xE2>', '<0x98>', '<0x83>']
  if kind != 't5':
    assert tokenizer.token_bytes()[snowman[-3:]].tolist() == [1, 1, 1]
  if kind != 'spm':
    assert tokenizer.decoder_steps == (['Metaspace'] if kind == 't5' else list(LLAMA_DECODER))
  first = tokenizer.encode('def f')[0]  # '▁def' or a shorter '▁'-piece: its space is text only after other text
  assert piece(first).startswith('\u2581')
  assert tokenizer.byte_counts([first]).sum() == tokenizer.token_bytes()[first] - 1


def test_unsupported_decoder_is_an_error_not_a_number():
  vocab = {t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'hello', '##s', ',', 'world'])}
  tok = hf_tokenizers.Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
  tok.add_special_tokens(['[PAD]', '[UNK]', '[CLS]', '[SEP]'])
  bert = tokenizers.HFTokenizer(tok, pad_id=0, source='bert/tokenizer.json')
  assert bert.token_bytes() is None  # loading it (as classification fine-tuning does) stays harmless
  with pytest.raises(ValueError, match='bert/tokenizer.json has a WordPiece decoder'):
    bert.byte_counts(bert.encode('hellos, world'))
  with pytest.raises(ValueError, match='token_bytes'):
    step.make_eval_step(None, bert.token_bytes())


@pytest.fixture(scope='module')
def lm():
  """A tiny random decoder whose vocabulary covers every tokenizer above, with its parameters."""
  config = ModelConfig(vocab_size=600, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn_dim=64, max_len=64,
                       compute_dtype='float32')
  model = Transformer(config, deterministic=True)
  zeros = np.zeros((1, 8), np.int32)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), zeros, zeros, zeros)['params'])


def test_eval_bits_per_byte_leaves_eos_out(lm):
  model, params = lm
  tokenizer = tokenizers.ByteTokenizer()
  a, b, zh0, zh1, bang = tokenizer.encode('abж!')
  eos, pad = tokenizer.eos_id, tokenizer.pad_id
  # Documents 'ab' and 'ж!' packed as tokens + EOS. A target counts when its input is in the same document; the
  # first token of each document is never one. Text targets: b, the second byte of ж, !; EOS twice.
  row_T = np.array([a, b, eos, zh0, zh1, bang, eos, pad, pad])
  batch = {'inputs': row_T[None, :-1], 'targets': row_T[None, 1:],
           'segment_ids': np.array([[1, 1, 1, 2, 2, 2, 2, 0]]), 'positions': np.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
           'weights': np.array([[1, 1, 0, 1, 1, 1, 0, 0]], np.float32)}
  sums = jax.jit(step.make_eval_step(model, tokenizer.token_bytes()))(params, {}, batch)
  out = step.summarize_eval(jax.tree.map(float, sums))
  logits_LV = np.asarray(jax.jit(model.apply)({'params': params}, batch['inputs'], batch['positions'],
                                              batch['segment_ids'])[0], np.float64)[0]
  log_p_LV = logits_LV - np.log(np.exp(logits_LV).sum(-1, keepdims=True))
  nll_L = -log_p_LV[np.arange(8), batch['targets'][0]]
  text, scored = [0, 3, 4], [0, 1, 3, 4, 5]
  assert float(sums['bytes']) == 3
  assert out['eval_bits_per_byte'] == pytest.approx(nll_L[text].sum() / (3 * math.log(2)), rel=1e-5)
  assert out['eval_loss'] == pytest.approx(nll_L[scored].mean(), rel=1e-5)  # every target, EOS included
  assert nll_L[[1, 5]].sum() / (3 * math.log(2)) > 1e-3 * out['eval_bits_per_byte'], 'EOS nats must tell'


class _Docs(list):
  name = 'docs'


@pytest.mark.parametrize('kind', ['bytes', 'spm', 'llama2'])
def test_packed_eval_counts_the_bytes_of_the_scored_text(make_tokenizer, lm, kind):
  tokenizer, (model, params) = make_tokenizer(kind), lm
  docs = _Docs(text for text in TEXTS if text[0].isascii() and not text[0].isspace())
  batches = pipeline.batches_from_sources([docs], [1.0], tokenizer, global_batch_size=2, seq_len=12, seed=0,
                                          shuffle=False, repeat=False, shuffle_window=4, process_index=0,
                                          process_count=1)
  eval_step = jax.jit(step.make_eval_step(model, tokenizer.token_bytes()))
  scored = sum(float(eval_step(params, {}, batch)['bytes']) for batch in batches)
  # Every token of a document but its first is a target once: the scored text is the document without the text
  # of its first token.
  expected = 0
  for text in docs:
    ids = tokenizer.encode(text)
    whole, first = tokenizer.decode(ids), tokenizer.decode(ids[:1])
    assert whole.startswith(first)
    expected += len(whole.encode('utf-8')) - len(first.encode('utf-8'))
  assert scored == expected
