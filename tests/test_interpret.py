"""lmlab.interpret capture, patching and lens on the tiny dense, MoE and encoder models."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.convert import testing
from lmlab.interpret import capture, lens, patch
from lmlab.models import Transformer
from lmlab.models.layers import Norm

CLEAN = np.array([[5, 17, 3, 40, 8, 21, 9, 2]], np.int32)
CORRUPT = np.array([[5, 17, 3, 61, 8, 21, 9, 2]], np.int32)  # one token differs, at position 3


@pytest.fixture(scope='module', params=['llama', 'mixtral', 'bert'])
def model(request):
  config = capture.analysis_config(testing.TINY[request.param])
  variables = {'params': jax.tree.map(jnp.asarray, testing.random_params(config))}
  variables['params'].pop('pooler', None)
  return config, variables, capture.capture(config, variables, CLEAN)


def test_weights_times_values_is_the_attention_output(model):
  config, variables, got = model
  params = variables['params']
  H, G = config.num_heads, config.num_kv_heads
  for i in range(config.num_layers):
    block = jax.tree.map(lambda w: w[i], params['layers']['block_0'])  # one block per group in these models
    x = got[f'layers/{i}/residual_in']
    if not config.post_norm:
      x = Norm(config).apply({'params': block['attn_norm']}, x)
    value = block['attn']['value']
    v_BSGK = jnp.einsum('BSD,DGK->BSGK', x, value['kernel']) + value.get('bias', 0.0)
    weights_BHLS = got[f'layers/{i}/attention/weights']
    np.testing.assert_allclose(weights_BHLS.sum(-1), 1.0, rtol=1e-6)
    if config.family == 'decoder':
      assert float(jnp.abs(jnp.triu(weights_BHLS[0, 0], k=1)).max()) == 0.0
    heads_BLHK = jnp.einsum('BHLS,BSHK->BLHK', weights_BHLS, jnp.repeat(v_BSGK, H // G, axis=2))
    np.testing.assert_allclose(got[f'layers/{i}/attention/heads'], heads_BLHK, rtol=1e-5, atol=1e-6)
    out = block['attn']['out']
    output_BLD = jnp.einsum('BLHK,HKD->BLD', heads_BLHK, out['kernel']) + out.get('bias', 0.0)
    np.testing.assert_allclose(got[f'layers/{i}/attention/output'], output_BLD, rtol=1e-5, atol=1e-6)


def test_captured_logits_are_the_models(model):
  config, variables, got = model
  training_config = dataclasses.replace(config, attention='auto')  # the fused path training uses
  logits, _ = jax.jit(Transformer(training_config).apply)(variables, CLEAN)
  np.testing.assert_allclose(got['logits'], logits, rtol=1e-5, atol=1e-5)
  assert set(got) >= {'embeddings', 'logits', f'layers/{config.num_layers - 1}/residual_out'}
  assert got['layers/1/attention/weights'].shape == (1, config.num_heads, 8, 8)


def test_patching_every_clean_activation_recovers_the_clean_logits(model):
  config, variables, clean = model
  names = ['embeddings'] + [f'layers/{i}/{s}' for i in range(config.num_layers)
                            for s in ('attention/heads', 'mlp/output')]
  corrupt = capture.capture(config, variables, CORRUPT)
  assert np.abs(corrupt['logits'] - clean['logits']).max() > 1e-3
  patched = patch.run_patched(config, variables, CORRUPT, {n: (True, clean[n]) for n in names})
  np.testing.assert_array_equal(patched['logits'], clean['logits'])


def test_activation_patching_per_layer_and_position(model):
  config, variables, _ = model
  if config.is_moe or config.family == 'encoder':
    pytest.skip('one compile of the patching sweep is enough (llama)')
  target = 11
  metric = lambda captured: jax.nn.log_softmax(captured['logits'][0, -1])[target]
  scores, clean, corrupt = patch.activation_patching(config, variables, CLEAN, CORRUPT, metric)
  assert scores.shape == (config.num_layers, 8)
  # Layer 0's input holds only each token's own embedding: patching the differing position restores the clean
  # run, patching any other one changes nothing.
  np.testing.assert_allclose(scores[0, 3], clean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.delete(scores[0], 3), corrupt, rtol=1e-5, atol=1e-5)
  assert abs(clean - corrupt) > 1e-4


def test_head_ablation_removes_exactly_that_heads_projection(model):
  config, variables, clean = model
  if config.is_moe or config.family == 'encoder':
    pytest.skip('the same site in every model; compiled once (llama)')
  layer, head = 1, 2
  ablated = patch.run_patched(config, variables, CLEAN, patch.head_ablation(clean, layer, head))
  w_HKD = variables['params']['layers']['block_0']['attn']['out']['kernel'][layer]
  removed = jnp.einsum('BLK,KD->BLD', clean[f'layers/{layer}/attention/heads'][:, :, head], w_HKD[head])
  np.testing.assert_allclose(ablated[f'layers/{layer}/attention/output'],
                             clean[f'layers/{layer}/attention/output'] - removed, rtol=1e-4, atol=1e-5)
  mean = patch.run_patched(config, variables, CLEAN, patch.head_ablation(clean, layer, head, 'mean'))
  heads_BLHK = mean[f'layers/{layer}/attention/heads']  # same patch shapes: the zero run's compile is reused
  np.testing.assert_allclose(heads_BLHK[:, :, head], jnp.broadcast_to(
      clean[f'layers/{layer}/attention/heads'][:, :, head].mean(1, keepdims=True), heads_BLHK[:, :, head].shape),
                             rtol=1e-6)
  np.testing.assert_allclose(np.delete(heads_BLHK, head, axis=2),
                             np.delete(clean[f'layers/{layer}/attention/heads'], head, axis=2), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='out of range'):
    patch.head_ablation(clean, layer, config.num_heads)


def test_moe_routing_capture_and_expert_ablation(model):
  config, variables, clean = model
  if not config.is_moe:
    pytest.skip('dense model')
  probs_BLN, experts_BLK = clean['layers/0/moe/router_probs'], clean['layers/0/moe/experts']
  np.testing.assert_allclose(probs_BLN.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.sort(experts_BLK, -1), np.sort(np.argsort(-probs_BLN, -1)[..., :2], -1))
  every = {}
  for e in range(config.moe.num_experts):  # ablating every expert leaves the MoE layer nothing to add
    (name, (mask, _)), = patch.expert_ablation(clean, 0, e).items()
    every[name] = (every.get(name, (False,))[0] | mask, jnp.zeros(mask.shape))
  ablated = patch.run_patched(config, variables, CLEAN, every)
  np.testing.assert_array_equal(ablated['layers/0/mlp/output'], 0.0)
  assert np.abs(clean['layers/0/mlp/output']).max() > 1e-3


def test_unknown_and_capture_only_sites_are_refused(model):
  config, _, clean = model
  with pytest.raises(ValueError, match='unknown site'):
    patch.patch_tree(config, {'layers/99/residual_in': (True, clean['layers/0/residual_in'])})
  with pytest.raises(ValueError, match='not patched'):
    patch.patch_tree(config, {'layers/0/attention/weights': (True, clean['layers/0/attention/weights'])})


def test_logit_lens_last_row_is_the_model(model):
  config, variables, got = model
  target = 7
  rows = lens.logit_lens(config, variables['params'], got, position=5, target=target)
  assert [r['layer'] for r in rows] == ['input'] + [f'layer {i}' for i in range(config.num_layers)]
  final = np.asarray(got['logits'][0, 5])
  assert rows[-1]['top_ids'][0] == int(np.argmax(final))
  assert rows[-1]['target_rank'] == int(np.sum(final > final[target]))
  np.testing.assert_allclose(rows[-1]['target_logprob'], jax.nn.log_softmax(final)[target], rtol=1e-5)
  last = lens.unembed(config, variables['params'], got[f'layers/{config.num_layers - 1}/residual_out'])
  np.testing.assert_allclose(last, got['logits'], rtol=1e-5, atol=1e-5)


def test_direct_logit_attribution_sums_to_the_logit(model):
  config, variables, got = model
  if config.post_norm:
    with pytest.raises(ValueError, match='pre-norm'):
      lens.direct_logit_attribution(config, variables['params'], got, 5, 7)
    return
  dla = lens.direct_logit_attribution(config, variables['params'], got, position=5, target=7)
  np.testing.assert_allclose(dla['total'], dla['logit'], rtol=1e-4, atol=1e-4)
  assert dla['heads'].shape == (config.num_layers, config.num_heads)
  assert abs(dla['logit']) > 1e-2


def test_direct_logit_attribution_with_a_pre_layernorm():
  config = capture.analysis_config(dataclasses.replace(testing.TINY['qwen2'], norm='layer'))  # tied, q/k/v biases
  params = jax.tree.map(jnp.asarray, testing.random_params(config))
  got = capture.capture(config, {'params': params}, CLEAN)
  dla = lens.direct_logit_attribution(config, params, got, position=6, target=30)
  assert dla['final_norm_bias'] != 0.0
  np.testing.assert_allclose(dla['total'], dla['logit'], rtol=1e-4, atol=1e-4)
