"""What experiments.interpret runs: one text through a pretrained model, every requested view written to a folder
(report.html, one PNG per view, attention.npy, interpret.json)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.finetune.data import encode_for_classification
from lmlab.finetune.tasks import HEAD_KEYS
from lmlab.interpret import attention_views, attribution, capture, lens, patch, report, routing
from lmlab.models.heads import ClassificationHead
METHODS = ('attention', 'rollout', 'grad_x_input', 'integrated_gradients', 'occlusion', 'logit_lens', 'patching',
           'routing')


def encode(config, tokenizer, text: str) -> list[int]:
  """Token ids as the model saw them in training: encoders get their tokenizer's specials ([CLS] ... [SEP])."""
  if config.family == 'encoder':
    return encode_for_classification(tokenizer, text, config.max_len)
  return tokenizer.encode(text)


def parse_methods(methods: str) -> list[str]:
  chosen = [m.strip() for m in methods.split(',') if m.strip()]
  unknown = sorted(set(chosen) - set(METHODS))
  if unknown or not chosen:
    raise ValueError(f'--methods has unknown {unknown or "(none given)"}; pick from {",".join(METHODS)}')
  return chosen


def _token_id(tokenizer, target: str) -> int:
  ids = [i for i in tokenizer.encode(target) if i != getattr(tokenizer, 'bos_id', None)]
  if len(ids) != 1:
    raise ValueError(f'--target={target!r} is {len(ids)} tokens for this tokenizer; give exactly one token')
  return ids[0]


def classifier_head(config, params: dict):
  """(ClassificationHead, its params) when `params` hold a fine-tuned classifier (lmlab.finetune), else None.

  A checkpoint keeps a BERT pooler only when its head pools with it (fine-tuning drops an unused one).
  """
  if 'classifier' not in params:
    return None
  head = {k: params[k] for k in HEAD_KEYS if k in params}
  pooling = 'pooler' if 'pooler' in head else 'mean'
  return ClassificationHead(config, int(params['classifier']['bias'].shape[0]), pooling), head


def class_logits(config, head, captured: dict, mask_BL):
  """Class logits [B, C] from a capture: the head on the final hidden states, as FinetuneModel applies it."""
  module, head_params = head
  last = f'layers/{config.num_layers - 1}/residual_out'
  hidden_BLD = captured[last] if config.post_norm else captured['final_norm']
  return module.apply({'params': head_params}, hidden_BLD, mask_BL)


def objective(config, head, captured, position: int, target: str | None, label: int | None, tokenizer):
  """(score(capture) -> scalar, target id, prediction id, kind): a classifier's class logit (`head` from
  classifier_head; default: its prediction) or the log-probability of the next token after `position` (default: the
  model's prediction). `_check` has refused a target or label that does not fit the model."""
  if head is not None:
    mask_1L = jnp.ones(captured['logits'].shape[:2], bool)
    score_of = lambda c, k: class_logits(config, head, c, mask_1L)[0, k]
    prediction = int(np.argmax(class_logits(config, head, captured, mask_1L)[0]))
    chosen = prediction if label is None else label
    return (lambda c: score_of(c, chosen)), chosen, prediction, 'class logit'
  prediction = int(np.argmax(captured['logits'][0, position]))
  chosen = prediction if target is None else _token_id(tokenizer, target)
  score = lambda c: jax.nn.log_softmax(c['logits'][0, position].astype(jnp.float32))[chosen]
  kind = 'next-token log-probability' if config.family == 'decoder' else 'token log-probability at the last position'
  return score, chosen, prediction, kind


def token_text(tokenizer, i: int) -> str:
  """How token i reads: its decoded text, or its vocabulary entry for specials that decode to nothing ([CLS])."""
  text = tokenizer.decode([i])
  inner = getattr(tokenizer, 'tokenizer', None)
  return text or (inner.id_to_token(i) or '' if hasattr(inner, 'id_to_token') else '')


def _check(methods: list[str], config, head, corrupt_text: str | None, target: str | None,
           label: int | None) -> None:
  """Refuses a method, target or label this model or input cannot take, before the slow work."""
  classifier = head is not None
  if classifier and target is not None:
    raise ValueError('this model is a classifier: pass --label=N instead of --target')
  if classifier and label is not None and not 0 <= label < head[0].num_classes:
    raise ValueError(f'--label={label} is out of range: the classifier has {head[0].num_classes} classes')
  if not classifier and label is not None:
    raise ValueError('--label is for classifiers; this model predicts tokens: pass --target=TOKEN')
  if 'routing' in methods and not config.is_moe:
    raise ValueError('--methods=routing needs a Mixture-of-Experts model; this one is dense')
  if 'logit_lens' in methods and classifier:
    raise ValueError('--methods=logit_lens reads token logits; this model is a classifier')
  if 'patching' in methods and corrupt_text is None:
    raise ValueError('--methods=patching needs --corrupt_text (same number of tokens as --text)')


def interpret(model, text: str, output_dir: str, methods: list[str], corrupt_text: str | None = None,
              target: str | None = None, label: int | None = None, ig_steps: int = 64,
              ig_rule: str = 'gauss_legendre', baseline: str = 'pad') -> dict:
  """Runs `methods` on `text` with `model` (a lmlab.convert.Pretrained); returns what interpret.json holds.

  The explained score is a classifier's class logit (`label`, default its prediction) or, for language models,
  the log-probability of the token after the last one (`target`, default the prediction).
  """
  if model.tokenizer is None:
    raise ValueError(f'{model.source} has no tokenizer to encode --text with')
  config = capture.analysis_config(dataclasses.replace(model.config, compute_dtype='float32'))
  variables = jax.tree.map(jnp.asarray, model.variables)
  params, tokenizer = variables['params'], model.tokenizer
  variables['params'] = {k: v for k, v in params.items() if k not in HEAD_KEYS}
  ids = encode(config, tokenizer, text)
  if not ids:
    raise ValueError('--text encodes to no tokens')
  tokens = [token_text(tokenizer, i) for i in ids]
  position = len(ids) - 1
  head = classifier_head(config, params)
  _check(methods, config, head, corrupt_text, target, label)
  classifier = head is not None
  captured = capture.capture(config, variables, np.asarray([ids]))
  score, target_id, prediction, kind = objective(config, head, captured, position, target, label, tokenizer)
  name = (lambda i: f'class {i}') if classifier else (lambda i: token_text(tokenizer, i))
  os.makedirs(output_dir, exist_ok=True)
  out = lambda file: os.path.join(output_dir, file)
  attention_XHLL = np.stack([np.asarray(captured[f'layers/{i}/attention/weights'][0], np.float32)
                             for i in range(config.num_layers)])
  np.save(out('attention.npy'), attention_XHLL)
  result = {'text': text, 'tokens': tokens, 'ids': ids, 'position': position, 'objective': kind,
            'target': target_id, 'target_name': name(target_id), 'prediction': prediction,
            'prediction_name': name(prediction), 'target_score': float(score(captured)), 'scores': {}}
  images = []
  f = attribution.embedding_objective(config, variables, ids, score)
  x_LD = attribution.token_embeddings(config, params, ids)
  base_LD = attribution.baseline(config, params, ids, baseline, getattr(tokenizer, 'pad_id', None))
  chosen = [m for m in methods if m in attribution.METHODS]
  if chosen:
    scores = attribution.attribute(f, x_LD, base_LD, chosen, ig_steps, ig_rule)
    result['scores'].update({m: np.asarray(scores[m]).tolist() for m in chosen})
    if 'integrated_gradients' in chosen:
      result.update(ig_completeness_gap=float(scores['ig_completeness_gap']), ig_steps=ig_steps, ig_rule=ig_rule,
                    ig_baseline=baseline)
  for method in methods:
    if method == 'attention':
      paths = attention_views.head_pngs(attention_XHLL, tokens, output_dir)
      images += [(os.path.basename(p)[:-4].replace('_', ' '), p) for p in paths]
    elif method == 'rollout':
      rollout_LL = attention_views.rollout(attention_XHLL)
      result['scores']['rollout'] = rollout_LL[position].tolist()
      images.append(('attention rollout', attention_views.heatmap_png(rollout_LL, tokens, 'attention rollout',
                                                                      out('rollout.png'))))
    elif method == 'logit_lens':
      result['logit_lens'] = lens.logit_lens(config, params, captured, position, target_id)
      for row in result['logit_lens']:
        row['top_tokens'] = [name(i) for i in row['top_ids']]
      if not config.post_norm:
        dla = lens.direct_logit_attribution(config, params, captured, position, target_id)
        result['direct_logit_attribution'] = {k: np.asarray(v).tolist() for k, v in dla.items()}
    elif method == 'patching':
      result['patching'] = _patching(config, variables, ids, corrupt_text, tokenizer, score, tokens, out, images)
    elif method == 'routing':
      result['routing'] = routing.routing_summary(captured, tokens)
      images.append(('MoE routing', routing.routing_png(result['routing'], tokens, out('routing.png'))))
  if result['scores']:
    images.insert(0, ('per-token scores', attention_views.token_scores_png(result['scores'], tokens,
                                                                          out('attribution.png'))))
  summary = {'model': model.source, 'explained': kind, 'target': result['target_name'],
             'prediction': result['prediction_name'], 'score': f'{result["target_score"]:.4f}'}
  if 'ig_completeness_gap' in result:
    summary['IG completeness gap'] = f'{result["ig_completeness_gap"]:.3g} ({ig_steps} steps, {ig_rule})'
  report.write_report(out('report.html'), title='lmlab interpret', text=text, tokens=tokens, summary=summary,
                      scores=result['scores'], attention_XHLL=attention_XHLL,
                      lens_rows=result.get('logit_lens'), decode=name,
                      routing=result.get('routing'), images=images)
  with open(out('interpret.json'), 'w', encoding='utf-8') as fp:
    json.dump(result, fp, indent=1)
  return result


def _patching(config, variables, ids, corrupt_text, tokenizer, score, tokens, out, images) -> dict:
  """Clean residual stream patched into the corrupted run per layer and position; PNG and a JSON dict."""
  corrupt = encode(config, tokenizer, corrupt_text)
  if len(corrupt) != len(ids):
    raise ValueError(f'--corrupt_text is {len(corrupt)} tokens and --text {len(ids)}; patching needs them aligned')
  scores_XL, clean, corrupted = patch.activation_patching(config, variables, [ids], [corrupt], score)
  images.append(('activation patching (score of the patched corrupted run)', attention_views.heatmap_png(
      scores_XL, tokens, 'clean residual patched in: score', out('patching.png'),
      rows=[f'layer {i}' for i in range(config.num_layers)], axes=('position', 'layer'))))
  return {'site': 'residual_in', 'clean': clean, 'corrupted': corrupted, 'scores': np.asarray(scores_XL).tolist()}
