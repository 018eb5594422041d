"""A sigmoid_bias MoE's router biases (model state, not params) travel with its weights: export, init_from,
evaluation and generation all apply them, and formats without a place for them refuse."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from experiments.configs import moe_tiny
from lmlab import convert, generate
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.eval import perplexity
from lmlab.finetune import tasks
from lmlab.models import Transformer, model_config_from_dict
from lmlab.train import build, loop
from test_generate import recompute_greedy

TEXT = 'import os\nprint(os.path.join("a", "b"))\n'


def moe_config(**overrides):
  """moe_tiny cut to d_model 32, 2 layers, 8 x 32 tokens; a bias rate large enough to move routing in 4 steps."""
  c = moe_tiny.get_config()
  c.steps, c.batch_size, c.seq_len, c.checkpoint_every, c.eval_every, c.progress = 4, 8, 32, 4, 0, False
  c.model.d_model, c.model.num_layers, c.model.ffn_dim, c.model.moe.expert_ffn_dim = 32, 2, 64, 32
  c.model.moe.router, c.model.moe.bias_update_rate = 'sigmoid_bias', 0.1
  return tiny.override(c, **overrides)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, its Orbax export, the checkpoint's own variables as Orbax reads them back, the model config)."""
  root = tmp_path_factory.mktemp('router')
  workdir, export = str(root / 'run'), str(root / 'export')
  config = moe_config()
  loop.run(config, workdir)
  convert.export(workdir, 'orbax', export)  # what `experiments.convert --pretrained=WORKDIR --to=orbax` runs
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, 'checkpoints', '4', 'state'))
  variables = {'params': state['params'], **state['model_state']}
  return workdir, export, variables, model_config_from_dict(config.model.to_dict())


def reference_loss(config, variables) -> float:
  """Mean NLL of every byte of TEXT after the first, from one forward pass over the whole text."""
  ids = np.array([ByteTokenizer().encode(TEXT)])
  logits = _forward(config)(variables, ids)[0]
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)), np.float64)
  return float(-np.mean([logp[i, ids[0, i + 1]] for i in range(ids.shape[1] - 1)]))


@functools.lru_cache(maxsize=None)
def _forward(config):
  return jax.jit(lambda variables, ids: Transformer(config).apply(variables, ids)[0])


def zeroed(variables):
  return {**variables, 'router_state': jax.tree.map(np.zeros_like, variables['router_state'])}


def test_export_and_workdir_evaluate_and_generate_with_the_trained_biases(run):
  workdir, export, variables, config = run
  biases = jax.tree.leaves(variables['router_state'])
  assert biases and min(np.abs(b).max() for b in biases) >= 0.1  # clearly moved in 4 steps
  expected = reference_loss(config, variables)
  assert abs(reference_loss(config, zeroed(variables)) - expected) > 1e-3  # the biases matter to this text
  prompt = ByteTokenizer().encode('import ')
  greedy = recompute_greedy(config, variables, prompt, 8)
  window_nll = perplexity.make_window_nll(config)  # compiled once for both
  for path in (workdir, export):
    model = convert.load_model(path)
    jax.tree.map(np.testing.assert_array_equal, model.model_state['router_state'], variables['router_state'])
    nll, count = perplexity.score_tokens(model.config, model.params, model.tokenizer.encode(TEXT), window=64,
                                         stride=32, window_nll=window_nll, model_state=model.model_state)
    assert count == len(TEXT) - 1 and abs(nll / count - expected) < 1e-5, (path, nll / count, expected)
    assert generate.generate(model.config, model.variables, [prompt], 8) == [greedy], path


def test_evaluate_cli_applies_the_biases(run, tmp_path):
  workdir, _, variables, config = run
  (tmp_path / 'text.txt').write_text(TEXT)
  result = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--pretrained={workdir}',
                           f'--text_file={tmp_path / "text.txt"}', '--window=64'], capture_output=True, text=True,
                          cwd=tiny.ROOT, env={**os.environ, 'PYTHONPATH': tiny.ROOT}, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert abs(json.loads(result.stdout.strip().splitlines()[-1])['loss'] - reference_loss(config, variables)) < 1e-5


def test_init_from_places_the_biases_on_the_abstract_state_shardings(run, tmp_path):
  _, export, variables, _ = run
  trainer = loop.Trainer(moe_config(init_from=export, **{'mesh.expert': 2}), str(tmp_path / 'next'))
  with trainer.parts.context():
    state = trainer.restore_or_init(trainer.batches('train', shuffle=True))
  trainer.checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state['router_state']),
               variables['router_state'])
  for leaf, target in zip(jax.tree.leaves(state.model_state['router_state']),
                          jax.tree.leaves(trainer.parts.shardings.model_state['router_state'])):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (leaf.sharding, target)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), variables['params'])


def test_formats_without_a_place_for_the_biases_refuse_in_one_line(run, tmp_path):
  workdir, export, _, _ = run
  refusals = [(lambda: convert.export(workdir, 'hf', str(tmp_path / 'hf')), 'only Mixtral-shaped MoE'),
              (lambda: convert.load_pretrained(export), r'applies with model state \(router_state\).*load_model')]
  for refuse, message in refusals:
    with pytest.raises(ValueError, match=message) as error:
      refuse()
    assert '\n' not in str(error.value)


def test_fine_tuning_init_from_places_the_router_biases(run):
  """An SFT task started from the export carries its trained biases into the fine-tuning state."""
  _, export, variables, _ = run
  config = moe_config(init_from=export, **{'finetune.task': 'sft'})
  parts = build.build(config, jax.devices()[:1], task=tasks.make_task(config))
  with parts.context():
    state = parts.create_state()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state['router_state']),
               variables['router_state'])
