"""RoPE scaling (Llama 3.x `llama3`, `linear`) from Hugging Face configs and GGUF files, checked against
transformers on tiny random Llama-3-style models past their original context, float32 compute."""
import dataclasses
import json
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='parity needs torch (pip install torch==2.13.0, the [parity] extra)')
transformers = pytest.importorskip('transformers', reason='parity needs transformers (the [parity] extra)')
gguf = pytest.importorskip('gguf', reason='the gguf package (pip install gguf) writes GGUF files')

from lmlab import convert, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.convert import hf, mapping, testing  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.models import Transformer, layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.test_convert_gguf import write_tiny_gguf  # pylint: disable=g-import-not-at-top,wrong-import-position

ORIGINAL = 16  # the tiny models' pretraining context; the tests run three times as long
SCALINGS = {
    # high_freq_factor 2 puts the tiny model's 8 frequencies in all three bands (kept, blended, divided).
    'llama3': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 2.0,
               'original_max_position_embeddings': ORIGINAL},
    'linear': {'rope_type': 'linear', 'factor': 4.0},
}


@pytest.fixture(scope='module', params=sorted(SCALINGS))
def tiny(request, tmp_path_factory):
  """(scaling, HF dir, transformers model, ids, its logits): a random LlamaForCausalLM saved as safetensors."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=96, max_position_embeddings=4 * ORIGINAL, rope_theta=500.0,
      rope_scaling=dict(SCALINGS[request.param]), initializer_range=0.1)  # 0.1: attention sharp enough for RoPE to show
  model = transformers.LlamaForCausalLM(config).eval()
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(str(path), safe_serialization=True)
  ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 3 * ORIGINAL))
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.numpy()
  return request.param, path, model, ids, logits


def logits_of(config, params, ids):
  config = dataclasses.replace(config, compute_dtype='float32')
  return np.asarray(jax.jit(lambda p, x: Transformer(config).apply({'params': p}, x)[0])(params, ids))


def test_inverse_frequencies_match_transformers(tiny):
  kind, path, model, _, _ = tiny
  config, _, _ = convert.load_pretrained(str(path))
  K = config.dims_per_head
  ours = np.asarray(layers.rope_inv_freq(K, config.rope_base, config))
  np.testing.assert_allclose(ours, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  ratio_k = np.asarray(layers.rope_inv_freq(K, config.rope_base)) / ours  # plain / scaled
  factor = SCALINGS[kind]['factor']
  if kind == 'linear':
    np.testing.assert_allclose(ratio_k, factor, rtol=1e-6)
  else:  # every band of the llama3 rule is exercised: kept, blended, divided
    assert np.isclose(ratio_k, 1).any() and np.isclose(ratio_k, factor).any(), ratio_k
    assert ((ratio_k > 1.01) & (ratio_k < factor - 0.01)).any(), ratio_k


def test_hf_logits_match_transformers_past_the_original_context(tiny):
  kind, path, _, ids, want = tiny
  config, params, _ = convert.load_pretrained(str(path))
  assert (config.rope_scaling, config.rope_factor) == (kind, SCALINGS[kind]['factor'])
  diff = np.abs(logits_of(config, params, ids) - want).max()
  assert diff < 1e-4, f'{kind}: max abs logit difference {diff:.2e} from transformers over {ids.shape[1]} tokens'
  plain = np.abs(logits_of(dataclasses.replace(config, rope_scaling='none'), params, ids) - want).max()
  assert plain > 0.1, f'{kind}: plain RoPE differs by only {plain:.2e}; the test cannot tell scaling apart'


def test_hf_export_round_trip_keeps_the_scaling(tiny, tmp_path):
  kind, path, _, ids, want = tiny
  config, params, _ = convert.load_pretrained(str(path))
  convert.save_hf(str(tmp_path), config, params)
  config2, _, _ = convert.load_pretrained(str(tmp_path))
  assert config2 == config
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert exported.config.rope_parameters['rope_type'] == kind
  with torch.no_grad():
    diff = np.abs(exported(torch.tensor(ids)).logits.numpy() - want).max()
  assert diff < 1e-4, f'{kind}: the exported model differs from the original by {diff:.2e}'


def llama_cpp_rope_freqs(base: float, dim: int, rope: dict) -> np.ndarray:
  """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it for rope_type llama3 (per-frequency divisors).

  The converter reads original_max_position_embeddings from the config's top level, defaulting to 8192 (Llama
  3.1's value); the tiny model's own value is passed here.
  """
  freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
  factor, low, high = rope['factor'], rope['low_freq_factor'], rope['high_freq_factor']
  old = rope['original_max_position_embeddings']
  factors = []
  for freq in freqs.tolist():
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      factors.append(1.0)
    elif wavelen > old / low:
      factors.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(factors, np.float32)


def with_gguf_extras(monkeypatch, add):
  """Makes write_tiny_gguf call add(writer) before the header: the keys and tensors a converter adds on top."""
  class Writer(gguf.GGUFWriter):
    def write_header_to_file(self, *args, **kwargs):
      add(self)
      super().write_header_to_file(*args, **kwargs)
  monkeypatch.setattr(gguf, 'GGUFWriter', Writer)


def test_gguf_logits_match_transformers(tiny, tmp_path, monkeypatch):
  kind, path, model, ids, _ = tiny
  config, params, _ = convert.load_pretrained(str(path))
  rope = SCALINGS[kind]
  if kind == 'llama3':  # llama.cpp keeps no llama3 parameters, only the divisors
    factors = llama_cpp_rope_freqs(config.rope_base, config.dims_per_head, rope)
    with_gguf_extras(monkeypatch, lambda w: w.add_tensor('rope_freqs.weight', factors))
  else:
    with_gguf_extras(monkeypatch, lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                             w.add_rope_scaling_factor(rope['factor'])))
  held = write_tiny_gguf(tmp_path / 'tiny.gguf', config, mapping.params_to_hf(config, params), with_tokenizer=False)
  reference = transformers.LlamaForCausalLM(model.config).eval()  # on the (quantised) weights the file holds
  reference.load_state_dict({name: torch.tensor(value) for name, value in held.items()})
  with torch.no_grad():
    want = reference(torch.tensor(ids)).logits.numpy()
  config2, params2, _ = convert.load_pretrained(str(tmp_path / 'tiny.gguf'))
  diff = np.abs(logits_of(config2, params2, ids) - want).max()
  assert diff < 1e-4, f'{kind} GGUF: max abs logit difference {diff:.2e} from transformers over {ids.shape[1]} tokens'
  plain = np.abs(logits_of(dataclasses.replace(config2, rope_scaling='none', rope_freq_factors=()), params2, ids)
                 - want).max()
  assert plain > 0.1, f'{kind} GGUF: plain RoPE differs by only {plain:.2e}; the test cannot tell scaling apart'
  if kind == 'llama3':
    assert (config2.rope_scaling, config2.rope_freq_factors) == ('none', tuple(factors.tolist()))
    saved = models.model_config_from_dict(json.loads(json.dumps(models.model_config_to_dict(config2))))
    assert saved == config2 and hash(saved) == hash(config2), saved  # JSON as orbax exports keep it; hashable
    with pytest.raises(ValueError, match='rope_freq_factors .* no Hugging Face form') as error:
      hf.config_to_hf(config2)
    assert '\n' not in str(error.value)
  else:
    assert (config2.rope_scaling, config2.rope_factor) == ('linear', rope['factor'])


def test_llama_3_1_config_reads_like_transformers():
  """The rope fields of Llama-3.1-8B's published config.json (old rope_scaling form) at full head_dim 128."""
  published = {'model_type': 'llama', 'vocab_size': 128256, 'hidden_size': 4096, 'intermediate_size': 14336,
               'num_hidden_layers': 32, 'num_attention_heads': 32, 'num_key_value_heads': 8,
               'max_position_embeddings': 131072, 'rope_theta': 500000.0,
               'rope_scaling': {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                'original_max_position_embeddings': 8192, 'rope_type': 'llama3'}}
  config = hf.config_from_hf(json.loads(json.dumps(published)))
  got = (config.rope_base, config.rope_scaling, config.rope_factor, config.rope_low_freq_factor,
         config.rope_high_freq_factor, config.rope_original_max_len)
  assert got == (500000.0, 'llama3', 8.0, 1.0, 4.0, 8192), got
  reference, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS['llama3'](
      transformers.LlamaConfig(**json.loads(json.dumps(published))))
  np.testing.assert_allclose(layers.rope_inv_freq(128, config.rope_base, config), reference.numpy(), rtol=1e-6)
  old_linear = hf.config_from_hf({**published, 'rope_scaling': {'type': 'linear', 'factor': 2.0}})
  assert (old_linear.rope_scaling, old_linear.rope_factor) == ('linear', 2.0)


@pytest.mark.parametrize('kind', ['yarn', 'dynamic', 'longrope'])
def test_unknown_hf_scaling_refused_in_one_line(tmp_path, kind):
  (tmp_path / 'config.json').write_text(json.dumps({**hf.config_to_hf(testing.TINY['llama']),
                                                    'rope_scaling': {'rope_type': kind, 'factor': 4.0}}))
  with pytest.raises(ValueError, match=f"rope scaling '{kind}' .*lmlab supports default, linear, llama3") as error:
    convert.load_pretrained(str(tmp_path))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('kind', ['yarn', 'longrope'])
def test_unknown_gguf_scaling_refused_in_one_line(tmp_path, monkeypatch, kind):
  with_gguf_extras(monkeypatch, lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType(kind)),
                                           w.add_rope_scaling_factor(4.0)))
  write_tiny_gguf(tmp_path / 'scaled.gguf', testing.TINY['llama'], {}, with_tokenizer=False)
  with pytest.raises(ValueError, match=f"uses rope scaling '{kind}'; lmlab supports none, linear") as error:
    convert.load_pretrained(str(tmp_path / 'scaled.gguf'))
  assert '\n' not in str(error.value)
