"""Perplexity: the sliding-window plan, equality with one full pass, Hugging Face's sliding-window
recipe on the same weights, and the evaluate entry point."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmlab import convert
from lmlab.convert import testing
from lmlab.eval import perplexity

CONFIG = dataclasses.replace(testing.TINY['llama'], vocab_size=288)


@pytest.mark.parametrize('n, window, stride', [(2, 8, 4), (9, 8, 4), (30, 8, 4), (30, 8, 7), (31, 8, 1), (30, 64, 32)])
def test_plan_scores_every_token_after_the_first_once(n, window, stride):
  plan = perplexity.plan_windows(n, window, stride)
  targets = [t for _, end, first in plan for t in range(first, end)]
  assert targets == list(range(1, n)), plan
  for begin, end, first in plan:
    assert end - begin <= window and first > begin, plan


def test_plan_refuses_non_overlapping_windows():
  with pytest.raises(ValueError, match='stride=8 must be between 1 and window-1=7'):
    perplexity.plan_windows(30, 8, 8)


def _random_ids(n, seed=0):
  return np.random.RandomState(seed).randint(0, CONFIG.vocab_size, n).tolist()


def test_sliding_window_equals_one_full_pass_when_the_window_covers_the_text():
  params = testing.random_params(CONFIG)
  ids = _random_ids(21)
  full = perplexity.score_tokens(CONFIG, params, ids, window=21, stride=10)
  wide = perplexity.score_tokens(CONFIG, params, ids, window=64, stride=32, batch_size=3)
  logits = jax.jit(perplexity.Transformer(CONFIG).apply)({'params': params}, np.array([ids]))[0]
  logp = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32)), np.float64)
  reference = -sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
  assert full[1] == wide[1] == 20
  assert abs(full[0] - reference) < 1e-4 and abs(wide[0] - reference) < 1e-4, (full, wide, reference)


def test_sliding_window_matches_the_hugging_face_recipe(tmp_path):
  """The perplexity guide's loop (labels masked with -100 before each window's new tokens) on the same weights."""
  torch = pytest.importorskip('torch', reason='the Hugging Face reference needs torch (the [parity] extra)')
  transformers = pytest.importorskip('transformers', reason='the Hugging Face reference needs transformers')
  params = testing.random_params(CONFIG)
  convert.save_hf(str(tmp_path), CONFIG, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids = torch.tensor([_random_ids(30, seed=1)])
  window, stride = 8, 3
  nlls, counts, prev_end = [], 0, 0
  for begin in range(0, ids.size(1), stride):
    end = min(begin + window, ids.size(1))
    trg_len = end - prev_end
    input_ids = ids[:, begin:end]
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
      loss = model(input_ids, labels=target_ids).loss
    n_valid = (target_ids[:, 1:] != -100).sum().item()  # the model shifts labels: position 0 is never a target
    nlls.append(loss.item() * n_valid)
    counts += n_valid
    prev_end = end
    if end == ids.size(1):
      break
  total, count = perplexity.score_tokens(CONFIG, params, ids[0].tolist(), window, stride, batch_size=4)
  assert count == counts == 29
  assert abs(total / count - sum(nlls) / counts) < 1e-5, (total / count, sum(nlls) / counts)
  with torch.no_grad():  # and one pass over the whole short text, labels=input_ids
    hf_loss = model(ids, labels=ids).loss.item()
  total, count = perplexity.score_tokens(CONFIG, params, ids[0].tolist(), window=64, stride=32)
  assert abs(total / count - hf_loss) <= 1e-5 * hf_loss, (total / count, hf_loss)


def test_evaluate_entry_point_writes_json(tmp_path):
  params = testing.random_params(CONFIG)
  tokenizer = testing.byte_level_tokenizer()
  convert.save_hf(str(tmp_path / 'model'), CONFIG, params, tokenizer)
  text = 'Sliding windows score every token once. ' * 3
  (tmp_path / 'text.txt').write_text(text)
  out = tmp_path / 'out' / 'ppl.json'
  run = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--pretrained={tmp_path / "model"}',
                        f'--text_file={tmp_path / "text.txt"}', f'--output_json={out}', '--window=32', '--stride=16'],
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': os.getcwd()}, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  expected = perplexity.evaluate_texts(CONFIG, params, tokenizer, [text], window=32, stride=16)
  assert result['tokens'] == len(text.encode()) - 1 == expected['tokens']
  assert abs(result['loss'] - expected['loss']) < 1e-5
  assert abs(result['perplexity'] - math.exp(result['loss'])) < 1e-6 * result['perplexity']
  # Bits per byte: the predicted tokens' nats over their bytes (byte-level: one each; the first token is context).
  n_bytes = len(text.encode()) - 1
  assert abs(result['bits_per_byte'] - result['loss'] * result['tokens'] / math.log(2) / n_bytes) < 1e-9


def test_evaluate_refuses_an_encoder():
  with pytest.raises(ValueError, match='perplexity needs a causal decoder'):
    perplexity.score_tokens(testing.TINY['bert'], {}, [1, 2, 3], window=8, stride=4)
