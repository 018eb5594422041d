"""What experiments.interpret runs: texts through a pretrained model, every requested view written to a folder.

One input (`interpret`): OUT/report.html, one PNG per view, OUT/attention.npy and OUT/interpret.json. Many inputs
(`interpret_many`): OUT/report.html with a section per input, OUT/interpret.json holding {'inputs': [one input's
dict, ...]}, OUT/attention.npy of the first input and the PNGs named inputK_*.png.

Many inputs run as one batch, right-padded to the longest (`explain`): each method is one compiled call over the
batch whose ids, positions and targets are arguments, so a run compiles each method once and a later batch of the
same size and padded length compiles nothing. Padding carries segment id 0: no real token attends to it, MoE routes
none of it and mean pooling leaves it out, so every input's numbers are those of running it alone (tested to 1e-5).
The one exception is a `capacity`-dispatch MoE, whose expert capacity grows with the padded length.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.finetune.data import encode_for_classification
from lmlab.finetune.tasks import HEAD_KEYS
from lmlab.interpret import attention_views, attribution, capture, lens, patch, report, routing
from lmlab.interpret import objective as objective_lib
METHODS = ('attention', 'rollout', 'grad_x_input', 'integrated_gradients', 'occlusion', 'logit_lens', 'patching',
           'routing')
TITLE = 'lmlab interpret'


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


def read_texts(path: str) -> list[str]:
  """--text_file's inputs: one per line without its line break; blank lines are skipped."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\r\n') for line in f]
  except (OSError, UnicodeDecodeError) as error:
    reason = getattr(error, 'strerror', None) or str(error)
    raise ValueError(f'--text_file={path} cannot be read ({reason}); give a UTF-8 text file, one input per line') \
        from None
  texts = [line for line in lines if line.strip()]
  if not texts:
    raise ValueError(f'--text_file={path} holds no input (it is empty or blank); write one input per line')
  return texts


def _token_id(tokenizer, target: str) -> int:
  ids = [i for i in tokenizer.encode(target) if i != getattr(tokenizer, 'bos_id', None)]
  if len(ids) != 1:
    raise ValueError(f'--target={target!r} is {len(ids)} tokens for this tokenizer; give exactly one token')
  return ids[0]


def token_text(tokenizer, i: int) -> str:
  """How token i reads: its decoded text, or its vocabulary entry for specials that decode to nothing ([CLS])."""
  text = tokenizer.decode([i])
  inner = getattr(tokenizer, 'tokenizer', None)
  return text or (inner.id_to_token(i) or '' if hasattr(inner, 'id_to_token') else '')


def _check(methods: list[str], config, objective, num_inputs: int, corrupt_text: str | None, target: str | None,
           label: int | None) -> None:
  """Refuses a method, target or label this model or input cannot take, before the slow work."""
  classifier = objective.num_classes > 0
  if classifier and target is not None:
    raise ValueError('this model is a classifier: pass --label=N instead of --target')
  if classifier and label is not None and not 0 <= label < objective.num_classes:
    raise ValueError(f'--label={label} is out of range: the classifier has {objective.num_classes} classes')
  if not classifier and label is not None:
    raise ValueError('--label is for classifiers; this model predicts tokens: pass --target=TOKEN')
  if 'routing' in methods and not config.is_moe:
    raise ValueError('--methods=routing needs a Mixture-of-Experts model; this one is dense')
  if 'logit_lens' in methods and classifier:
    raise ValueError('--methods=logit_lens reads token logits; this model is a classifier')
  if 'patching' in methods and num_inputs != 1:
    raise ValueError('--methods=patching compares one --text with its --corrupt_text; leave it out for --text_file')
  if 'patching' in methods and corrupt_text is None:
    raise ValueError('--methods=patching needs --corrupt_text (same number of tokens as --text)')


@dataclasses.dataclass
class Explained:
  """One input's numbers: `result` is its interpret.json dict, `attention_XHLL` its attention [layers, heads, L, L]
  over its own tokens, `rollout_LL` the attention rollout when asked for."""
  result: dict
  attention_XHLL: np.ndarray
  rollout_LL: np.ndarray | None = None


@dataclasses.dataclass
class _Batch:
  """The right-padded inputs and what every method reads: the analysed model, the objective and one capture."""
  config: object
  variables: dict       # the transformer's, without the classifier head
  params: dict          # all of them, head included
  objective: objective_lib.Objective
  head_params: dict
  tokens_BL: np.ndarray
  real_BL: np.ndarray   # 1 on real tokens, 0 on padding: the segment ids
  positions_B: np.ndarray
  targets_B: np.ndarray
  captured: dict


def explain(model, texts: list[str], methods: list[str], corrupt_text: str | None = None, target: str | None = None,
            label: int | None = None, ig_steps: int = 64, ig_rule: str = 'gauss_legendre', baseline: str = 'pad',
            progress: bool = False) -> list[Explained]:
  """Runs `methods` on `texts` with `model` (a lmlab.convert.Pretrained) as one padded batch; nothing is written.

  The explained score is a classifier's class logit (`label`, default its prediction) or, for language models,
  the log-probability of the token after each input's last one (`target`, default the prediction). `progress`
  prints a line per stage and per round of attribution.
  """
  if model.tokenizer is None:
    raise ValueError(f'{model.source} has no tokenizer to encode --text with')
  config = capture.analysis_config(dataclasses.replace(model.config, compute_dtype='float32'))
  variables = jax.tree.map(jnp.asarray, model.variables)
  params, tokenizer = variables['params'], model.tokenizer
  variables['params'] = {k: v for k, v in params.items() if k not in HEAD_KEYS}
  objective, head_params = objective_lib.for_model(config, params)
  _check(methods, config, objective, len(texts), corrupt_text, target, label)
  rows = [encode(config, tokenizer, text) for text in texts]
  empty = [k + 1 for k, ids in enumerate(rows) if not ids]
  if empty:
    raise ValueError('--text encodes to no tokens' if len(texts) == 1 else f'inputs {empty} encode to no tokens')
  say = (lambda line: print(line, flush=True)) if progress else (lambda line: None)
  lengths_B = np.array([len(ids) for ids in rows])
  B, L = len(rows), int(lengths_B.max())
  pad_id = getattr(tokenizer, 'pad_id', None)
  tokens_BL = np.array([ids + [pad_id or 0] * (L - len(ids)) for ids in rows], np.int32)
  real_BL = (np.arange(L)[None] < lengths_B[:, None]).astype(np.int32)
  say(f'{B} input(s) padded to {L} tokens: capturing')
  captured = capture.capture(config, variables, tokens_BL, real_BL)
  scores_BC = np.asarray(objective.scores(head_params, captured, real_BL, lengths_B - 1))
  predictions_B = np.argmax(scores_BC, axis=-1)
  chosen_target = label if objective.num_classes else None if target is None else _token_id(tokenizer, target)
  targets_B = predictions_B if chosen_target is None else np.full(B, chosen_target)
  target_scores_B = np.take_along_axis(scores_BC, targets_B[:, None], axis=1)[:, 0]
  batch = _Batch(config, variables, params, objective, head_params, tokens_BL, real_BL, lengths_B - 1, targets_B,
                 captured)
  name = (lambda i: f'class {i}') if objective.num_classes else (lambda i: token_text(tokenizer, i))
  attention_BXHLL = np.stack([np.asarray(captured[f'layers/{i}/attention/weights'], np.float32)
                              for i in range(config.num_layers)], axis=1)
  explained = []
  for b, (text, ids) in enumerate(zip(texts, rows)):
    t, p, n = int(targets_B[b]), int(predictions_B[b]), len(ids)
    explained.append(Explained({
        'text': text, 'tokens': [token_text(tokenizer, i) for i in ids], 'ids': ids, 'position': n - 1,
        'objective': objective.kind, 'target': t, 'target_name': name(t), 'prediction': p, 'prediction_name': name(p),
        'target_score': float(target_scores_B[b]), 'scores': {}}, attention_BXHLL[b, :, :, :n, :n]))
  chosen = [m for m in methods if m in attribution.METHODS]
  if chosen:
    say(f'attribution ({", ".join(chosen)}): {B} input(s) in one compiled call')
    _attribute(batch, explained, chosen, ig_steps, ig_rule, baseline, pad_id, progress)
  for method in methods:
    if method == 'rollout':
      for e in explained:
        e.rollout_LL = attention_views.rollout(e.attention_XHLL)
        e.result['scores']['rollout'] = e.rollout_LL[e.result['position']].tolist()
    elif method == 'logit_lens':
      say('logit lens')
      _logit_lens(batch, explained, name)
    elif method == 'patching':  # one input, not padded
      score = lambda c: objective(head_params, c, real_BL, batch.positions_B, targets_B)[0]
      explained[0].result['patching'] = _patching(config, variables, rows[0], encode(config, tokenizer, corrupt_text),
                                                  score)
    elif method == 'routing':
      for b, e in enumerate(explained):
        e.result['routing'] = routing.routing_summary(captured, e.result['tokens'], row=b)
  return explained


def _attribute(batch: _Batch, explained: list[Explained], methods: list[str], ig_steps: int, ig_rule: str,
               baseline: str, pad_id: int | None, progress: bool) -> None:
  """Adds the attribution methods' per-token scores (and IG's gap) to every input's result: one compiled call."""
  x_BLD = attribution.token_embeddings(batch.config, batch.params, batch.tokens_BL)
  base_BLD = attribution.baseline(batch.config, batch.params, batch.tokens_BL, baseline, pad_id)
  scores = attribution.attribute_inputs(batch.config, batch.variables, batch.objective, batch.head_params,
                                        batch.tokens_BL, batch.real_BL, batch.positions_B, batch.targets_B, x_BLD,
                                        base_BLD, methods, ig_steps, ig_rule, progress=progress)
  scores = jax.tree.map(np.asarray, scores)
  for b, e in enumerate(explained):
    e.result['scores'].update({m: scores[m][b, :len(e.result['ids'])].tolist() for m in methods})
    if 'integrated_gradients' in methods:
      e.result.update(ig_completeness_gap=float(scores['ig_completeness_gap'][b]), ig_steps=ig_steps,
                      ig_rule=ig_rule, ig_baseline=baseline)


def _logit_lens(batch: _Batch, explained: list[Explained], name) -> None:
  """Adds the logit lens (and, for pre-norm models, direct logit attribution) to every input's result."""
  rows = range(len(explained))
  lens_rows = lens.logit_lens_rows(batch.config, batch.params, batch.captured, rows, batch.positions_B,
                                   batch.targets_B)
  for e, layers in zip(explained, lens_rows):
    for row in layers:
      row['top_tokens'] = [name(i) for i in row['top_ids']]
    e.result['logit_lens'] = layers
  if not batch.config.post_norm:
    dla = lens.direct_logit_attribution_rows(batch.config, batch.params, batch.captured, rows, batch.positions_B,
                                             batch.targets_B)
    for e, parts in zip(explained, dla):
      e.result['direct_logit_attribution'] = {k: np.asarray(v).tolist() for k, v in parts.items()}


def _patching(config, variables, ids: list[int], corrupt: list[int], score) -> dict:
  """Clean residual stream patched into the corrupted run per layer and position, as a JSON dict."""
  if len(corrupt) != len(ids):
    raise ValueError(f'--corrupt_text is {len(corrupt)} tokens and --text {len(ids)}; patching needs them aligned')
  scores_XL, clean, corrupted = patch.activation_patching(config, variables, [ids], [corrupt], score)
  return {'site': 'residual_in', 'clean': clean, 'corrupted': corrupted, 'scores': np.asarray(scores_XL).tolist()}


def interpret(model, text: str, output_dir: str, methods: list[str], corrupt_text: str | None = None,
              target: str | None = None, label: int | None = None, ig_steps: int = 64,
              ig_rule: str = 'gauss_legendre', baseline: str = 'pad') -> dict:
  """Runs `methods` on `text` (see `explain`) and writes the one-input folder; returns what interpret.json holds."""
  e, = explain(model, [text], methods, corrupt_text, target, label, ig_steps, ig_rule, baseline)
  os.makedirs(output_dir, exist_ok=True)
  np.save(os.path.join(output_dir, 'attention.npy'), e.attention_XHLL)
  images = _write_views(e, methods, model.config, output_dir, '')
  summary = {'model': model.source, 'explained': e.result['objective'], **_summary(e.result)}
  report.write_report(os.path.join(output_dir, 'report.html'), title=TITLE, **_section(e, model, summary, images))
  with open(os.path.join(output_dir, 'interpret.json'), 'w', encoding='utf-8') as fp:
    json.dump(e.result, fp, indent=1)
  return e.result


def interpret_many(model, texts: list[str], output_dir: str, methods: list[str], target: str | None = None,
                   label: int | None = None, ig_steps: int = 64, ig_rule: str = 'gauss_legendre',
                   baseline: str = 'pad', progress: bool = False) -> dict:
  """Runs `methods` on every text in one padded batch (see `explain`) and writes the many-input folder (module
  docstring); returns what interpret.json holds, {'inputs': [one dict per text]}. `progress` prints a line per stage,
  per attribution step and per input written."""
  explained = explain(model, texts, methods, None, target, label, ig_steps, ig_rule, baseline, progress)
  os.makedirs(output_dir, exist_ok=True)
  np.save(os.path.join(output_dir, 'attention.npy'), explained[0].attention_XHLL)
  n, width = len(explained), len(str(len(explained)))
  body = [report.summary_table({'model': model.source, 'explained': explained[0].result['objective'], 'inputs': n})]
  for k, e in enumerate(explained, 1):
    if progress:
      print(f'input {k} of {n}: writing its views', flush=True)
    images = _write_views(e, methods, model.config, output_dir, f'input{k:0{width}d}_')
    body.append(f'<section><h2>Input {k} of {n}</h2>'
                + report.input_section(**_section(e, model, _summary(e.result), images), heading=3, suffix=f'-{k}')
                + '</section>')
  report.write_page(os.path.join(output_dir, 'report.html'), TITLE, body)
  saved = {'inputs': [e.result for e in explained]}
  with open(os.path.join(output_dir, 'interpret.json'), 'w', encoding='utf-8') as fp:
    json.dump(saved, fp, indent=1)
  return saved


def _summary(result: dict) -> dict:
  summary = {'target': result['target_name'], 'prediction': result['prediction_name'],
             'score': f'{result["target_score"]:.4f}'}
  if 'ig_completeness_gap' in result:
    summary['IG completeness gap'] = (f'{result["ig_completeness_gap"]:.3g} ({result["ig_steps"]} steps, '
                                      f'{result["ig_rule"]})')
  return summary


def _section(e: Explained, model, summary: dict, images: list) -> dict:
  """report.input_section's arguments for one input."""
  return dict(text=e.result['text'], tokens=e.result['tokens'], summary=summary, scores=e.result['scores'],
              attention_XHLL=e.attention_XHLL, lens_rows=e.result.get('logit_lens'),
              decode=lambda i: token_text(model.tokenizer, i), routing=e.result.get('routing'), images=images)


def _write_views(e: Explained, methods: list[str], config, output_dir: str, prefix: str) -> list[tuple[str, str]]:
  """One input's PNGs, each file name starting with `prefix`; (caption, path) in the report's order."""
  tokens, images = e.result['tokens'], []
  out = lambda file: os.path.join(output_dir, prefix + file)
  for method in methods:
    if method == 'attention':
      paths = attention_views.head_pngs(e.attention_XHLL, tokens, output_dir, prefix)
      images += [(os.path.basename(p)[len(prefix):-4].replace('_', ' '), p) for p in paths]
    elif method == 'rollout':
      images.append(('attention rollout', attention_views.heatmap_png(e.rollout_LL, tokens, 'attention rollout',
                                                                      out('rollout.png'))))
    elif method == 'patching':
      images.append(('activation patching (score of the patched corrupted run)', attention_views.heatmap_png(
          np.asarray(e.result['patching']['scores']), tokens, 'clean residual patched in: score', out('patching.png'),
          rows=[f'layer {i}' for i in range(config.num_layers)], axes=('position', 'layer'))))
    elif method == 'routing':
      images.append(('MoE routing', routing.routing_png(e.result['routing'], tokens, out('routing.png'))))
  if e.result['scores']:
    images.insert(0, ('per-token scores', attention_views.token_scores_png(e.result['scores'], tokens,
                                                                          out('attribution.png'))))
  return images
