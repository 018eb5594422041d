"""FLOPs per token: the DESIGN.md formula, checked by hand and against the real parameter tree."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import dense_1b, dense_135m
from lmlab.models import Transformer, model_config_from_dict
from lmlab.train import flops


def test_dense_1b_flops_by_hand():
  c = model_config_from_dict(dense_1b.get_config().model.to_dict())
  attention = 2048 * 64 * (2 * 32 + 2 * 8)
  mlp = 3 * 2048 * 5632
  expected_params = 16 * (attention + mlp) + 32000 * 2048
  assert flops.active_matmul_params(c) == expected_params == 786_956_288
  assert flops.flops_per_token(c, 2048) == 6 * expected_params + 6 * 16 * 2048 * 2048


def test_active_params_equal_the_model_matrices():
  """Dense model: every 2-D+ kernel plus the (tied) embedding used as the LM head, nothing else."""
  c = model_config_from_dict(dense_135m.get_config().model.to_dict())
  shapes = jax.eval_shape(lambda: Transformer(c).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  matrices = sum(math.prod(x.shape) for path, x in leaves if 'kernel' in jax.tree_util.keystr(path))
  embedding = math.prod(shapes['params']['embed']['embedding'].value.shape)
  assert flops.active_matmul_params(c) == matrices + embedding


def test_peak_by_device_kind():
  assert flops.peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert flops.peak_tflops('cpu') is None
  assert np.isclose(flops.peak_tflops('TPU v5 lite'), 197.0)


def test_moe_flops_count_only_the_experts_that_run():
  """Switch routing (one pick whatever top_k says), zero-computation experts cost nothing, MoE every 2nd layer."""
  c = model_config_from_dict({
      'vocab_size': 100, 'd_model': 8, 'num_layers': 4, 'num_heads': 2, 'num_kv_heads': 1, 'ffn_dim': 16,
      'mlp': 'gelu', 'moe': {'num_experts': 6, 'top_k': 2, 'router': 'switch', 'expert_ffn_dim': 4,
                             'every': 2, 'shared_experts': 1, 'zero_experts': 2}})
  attention = 8 * 4 * (2 * 2 + 2 * 1)          # D * K * (2H + 2G) = 192
  dense_mlp = 2 * 8 * 16                        # GELU up + down = 256
  routed = 1 * 3 * 8 * 4                        # one SwiGLU expert of width 4 = 96, when the pick computes
  shared = 2 * 8 * 4                            # a GELU expert of width 4 = 64
  router = 8 * (6 + 2)                          # 64
  head = 100 * 8
  uniform = 2 * (2 * attention + dense_mlp + routed * 6 / 8 + shared + router) + head
  assert flops.active_matmul_params(c) == uniform == 2 * (384 + 256 + 72 + 64 + 64) + 800
  load_XN = [[0.1] * 6 + [0.2, 0.2], [0.05] * 6 + [0.35, 0.35]]  # 60% and 30% of picks reach a computing expert
  assert flops.computing_share(c, load_XN) == pytest.approx(0.45)
  measured = 2 * (2 * attention + dense_mlp + routed * 0.45 + shared + router) + head
  assert flops.active_matmul_params(c, 0.45) == pytest.approx(measured)
  assert flops.flops_per_token(c, 32, 0.45) == pytest.approx(6 * measured + 6 * 4 * 32 * 8)


def test_measured_share_from_a_float32_load_is_a_json_number():
  """experiments.benchmark passes the device's float32 `moe/load` and writes the FLOPs as JSON."""
  c = model_config_from_dict({'moe': {'num_experts': 3, 'zero_experts': 1}})
  load_XN = np.array([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125]], np.float32)
  share = flops.computing_share(c, load_XN)
  assert share == 0.8125  # (0.75 + 0.875) / 2
  record = json.loads(json.dumps({'share': share, 'flops_per_token': flops.flops_per_token(c, 16, share)}))
  assert record['share'] == 0.8125
