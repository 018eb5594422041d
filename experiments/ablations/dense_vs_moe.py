"""Dense vs MoE at equal active FLOPs (a zip group): a dense SwiGLU of width F, 8 experts top-1 of width F, and
8 experts top-2 of width F/2 all run the same matmul FLOPs per token (up to the tiny router)."""
from lmlab.sweep.grid import Spec


def get_spec() -> Spec:
  return Spec(config='experiments/configs/moe_tiny.py',
              zip=[{'model.moe.num_experts': [0, 8, 8], 'model.moe.top_k': [1, 1, 2],
                    'model.moe.expert_ffn_dim': [0, 0, 192],  # 0: the dense ffn_dim (384)
                    'model.moe.router': ['softmax', 'switch', 'softmax']}],
              seeds=3,
              trend='both MoE variants reach a lower eval loss than dense at the same active FLOPs, the finer '
                    'top-2 one at least as low as top-1; tokens/s is lower for MoE on CPU (dispatch overhead)')
