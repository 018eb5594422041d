"""Generation: KV-cache decoding equals full recomputation, sampling controls, EOS, loading a run's checkpoint."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab import convert, generate
from lmlab.convert.testing import TINY, random_params
from lmlab.models import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = TINY['llama']  # GQA 4 query / 2 kv heads, untied head
PROMPTS = [[5, 9, 11, 3, 7], [8, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope='module')
def variables():
  return {'params': random_params(CONFIG, seed=0)}


def recompute_greedy(config, variables, prompt, n, width=32):
  """The slow reference: the whole sequence through the model for every new token, no cache.

  The sequence sits at the start of a fixed-width row (one compile); causal attention keeps the
  padding after it from touching the logits read at its last token.
  """
  forward = jax.jit(lambda v, t: Transformer(config).apply(v, t)[0])
  tokens = list(prompt)
  for _ in range(n):
    logits_BLV = forward(variables, jnp.array([tokens + [0] * (width - len(tokens))]))
    tokens.append(int(jnp.argmax(logits_BLV[0, len(tokens) - 1])))
  return tokens[len(prompt):]


@pytest.mark.parametrize('name', ['llama', 'qwen2'])
def test_cached_greedy_equals_recomputation_for_prompts_of_different_lengths(name):
  config = TINY[name]
  variables = {'params': random_params(config, seed=1)}
  out = generate.generate(config, variables, PROMPTS, max_new_tokens=10)
  assert out == [recompute_greedy(config, variables, p, 10) for p in PROMPTS]


def test_cache_holds_only_the_kv_heads(variables):
  cache = generate.init_cache(Transformer(CONFIG), variables, batch=3, length=20)
  attn = cache['layers']['block_0']['attn']
  K = CONFIG.d_model // CONFIG.num_heads
  assert attn['cached_key'].shape == (CONFIG.num_layers, 3, 20, CONFIG.num_kv_heads, K)
  assert attn['cached_segment_ids'].shape == (CONFIG.num_layers, 3, 20)


def test_left_padding_aligns_prompts_and_rounds_the_length():
  tokens, lengths = generate.left_pad([[4, 5, 6], [7]], pad_id=0, multiple=4)
  np.testing.assert_array_equal(tokens, [[0, 4, 5, 6], [0, 0, 0, 7]])
  np.testing.assert_array_equal(lengths, [3, 1])
  with pytest.raises(ValueError, match='at least one token'):
    generate.left_pad([[1], []], pad_id=0)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(variables):
  sample = lambda seed, **kw: generate.generate(CONFIG, variables, PROMPTS, 8, generate.Sampling(**kw), seed=seed)
  hot = dict(temperature=1.5, top_p=0.95)
  assert sample(3, **hot) == sample(3, **hot)
  assert sample(3, **hot) != sample(4, **hot)
  assert sample(5, temperature=1.0, top_k=1) == generate.generate(CONFIG, variables, PROMPTS, 8)


def test_top_p_and_top_k_drop_the_unlikely_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draw = lambda s: {int(generate.sample_logits(logits, k, s)[0]) for k in jax.random.split(jax.random.key(0), 200)}
  assert draw(generate.Sampling(temperature=1.0, top_p=0.7)) == {0, 1}    # 0.5 < 0.7 needs the second token
  assert draw(generate.Sampling(temperature=1.0, top_p=0.5)) == {0}
  assert draw(generate.Sampling(temperature=1.0, top_k=3)) == {0, 1, 2}


def test_eos_stops_only_its_own_row(variables):
  free = generate.generate(CONFIG, variables, PROMPTS, 10)
  eos = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])  # row 0 stops late
  out = generate.generate(CONFIG, variables, PROMPTS, 10, eos_ids=(eos,))
  for row, full in zip(out, free):
    stop = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:stop]
  assert len(out[0]) >= 3 and out[0][-1] == eos


def train_tiny_run(workdir):
  from experiments.configs import dense_tiny  # pylint: disable=g-import-not-at-top
  from lmlab.train import loop  # pylint: disable=g-import-not-at-top
  c = dense_tiny.get_config()
  c.steps, c.batch_size, c.seq_len, c.checkpoint_every, c.eval_every, c.progress = 2, 8, 32, 2, 0, False
  c.model.d_model, c.model.num_layers, c.model.ffn_dim = 32, 2, 64
  loop.run(c, workdir)
  return c


def test_workdir_checkpoint_generates_like_its_params(tmp_path):
  workdir = str(tmp_path / 'run')
  train_tiny_run(workdir)
  model = convert.load_model(workdir)
  config, params, tokenizer, step = model.config, model.params, model.tokenizer, model.step
  assert step == 2 and tokenizer.name == 'bytes' and config.d_model == 32
  prompt = tokenizer.encode('def ')
  out = generate.generate(config, {'params': params}, [prompt], 6)
  assert out == [recompute_greedy(config, {'params': params}, prompt, 6)]


def test_generate_cli_needs_exactly_one_model_source(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'experiments.generate', '--prompt=hi'], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=120)
  assert result.returncode == 2 and 'exactly one of --pretrained' in result.stderr
