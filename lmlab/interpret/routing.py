"""MoE routing views: each token's top expert per MoE layer, the tokens each expert took, router entropy per token."""
import numpy as np


def moe_layers(captured: dict) -> list[int]:
  """Layers with a MoE feed-forward (those whose router was captured), in order."""
  return sorted(int(name.split('/')[1]) for name in captured if name.endswith('/moe/router_probs'))


def routing_summary(captured: dict, tokens: list[str], row: int = 0) -> list[dict]:
  """Per MoE layer: top expert and router entropy (nats) per token, and each expert's (position, token) list."""
  layers = []
  L = len(tokens)
  for i in moe_layers(captured):
    probs_LN = np.asarray(captured[f'layers/{i}/moe/router_probs'][row, :L], np.float64)
    experts_LK = np.asarray(captured[f'layers/{i}/moe/experts'][row, :L])
    entropy_L = -np.sum(probs_LN * np.log(np.maximum(probs_LN, np.finfo(np.float64).tiny)), axis=-1)
    per_expert = {e: [] for e in range(probs_LN.shape[-1])}
    for position, chosen in enumerate(experts_LK):
      for e in chosen:
        per_expert[int(e)].append([position, tokens[position]])
    layers.append({'layer': i, 'top_expert': experts_LK[:, 0].tolist(), 'experts': experts_LK.tolist(),
                   'entropy': entropy_L.tolist(), 'tokens_per_expert': {str(e): v for e, v in per_expert.items()}})
  return layers


def routing_png(summary: list[dict], tokens: list[str], path: str) -> str:
  """Tokens (columns) coloured by their top expert, one row per MoE layer, entropy written under each cell."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  top_XL = np.array([layer['top_expert'] for layer in summary])
  num_experts = len(summary[0]['tokens_per_expert'])
  fig, ax = plt.subplots(figsize=(min(16, 2 + 0.5 * len(tokens)), 1 + 0.6 * len(summary)))
  image = ax.imshow(top_XL, cmap='tab20', vmin=-0.5, vmax=max(num_experts, 20) - 0.5, aspect='auto')
  for x, layer in enumerate(summary):
    for l, (e, h) in enumerate(zip(layer['top_expert'], layer['entropy'])):
      ax.text(l, x, f'{e}\n{h:.2f}', ha='center', va='center', fontsize=6)
  ax.set_xticks(range(len(tokens)), [t.replace('$', r'\$') for t in tokens], rotation=90, fontsize=7)
  ax.set_yticks(range(len(summary)), [f'layer {layer["layer"]}' for layer in summary])
  ax.set_title('top expert per token (number) and router entropy in nats (below)')
  fig.colorbar(image, ax=ax, ticks=range(num_experts), label='top expert')
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
