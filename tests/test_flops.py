"""FLOPs per token: the DESIGN.md formula, checked by hand and against the real parameter tree."""
import math

import jax
import jax.numpy as jnp
import numpy as np

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
