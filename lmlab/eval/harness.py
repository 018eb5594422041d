"""lm-evaluation-harness adapter: `LmlabLM`, an `lm_eval.api.model.LM` for any lmlab decoder, and `run`, which
wraps `lm_eval.simple_evaluate` (offline tasks from an include path). No torch: scoring is lmlab's packed Scorer
(lm-eval's request split, prefix token, truncation and rolling windows), generation lmlab's KV-cache decoder.
"""
import json

from lm_eval.api import model as lm_model
from lm_eval.models.utils import normalize_gen_kwargs

from lmlab import generate as generate_lib
from lmlab.eval import tasks

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


class LmlabLM(lm_model.LM):
  """`model`: anything with .config, .variables, .tokenizer, .source (lmlab.convert.Pretrained)."""

  def __init__(self, model, batch_size: int = 8, max_len: int | None = None, seed: int = 0):
    super().__init__()
    if model.tokenizer is None:
      raise ValueError(f'{model.source} has no tokenizer; lm-eval sends text')
    self.model, self.seed = model, seed
    self.settings = tasks.Settings(batch_size=batch_size, max_len=max_len, seed=seed)
    self.scorer = tasks.make_scorer(model, self.settings)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """'pretrained=PATH[,batch_size=N,max_len=N]' (lm-eval's --model_args) -> LmlabLM."""
    from lmlab import convert  # pylint: disable=g-import-not-at-top
    args = dict(item.split('=', 1) for item in arg_string.split(',') if item)
    if 'pretrained' not in args:
      raise ValueError(f'model_args {arg_string!r} need pretrained=PATH')
    batch_size = (additional_config or {}).get('batch_size') or args.get('batch_size', 8)
    max_len = args.get('max_len')
    return cls(convert.load_model(args['pretrained']), int(batch_size), int(max_len) if max_len else None)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    return self.scorer.loglikelihood([request.args for request in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    return self.scorer.loglikelihood_rolling([request.args[0] for request in requests])

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample and a temperature) continuations cut at the first `until` string; requests
    sharing generation settings run as one batched job."""
    del disable_tqdm
    groups = {}
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append((i, context))
    out = [''] * len(requests)
    for key, members in groups.items():
      kwargs = normalize_gen_kwargs(json.loads(key), DEFAULT_MAX_GEN_TOKS)
      settings = tasks.Settings(batch_size=self.settings.batch_size, max_new_tokens=kwargs['max_gen_toks'])
      sampling = generate_lib.Sampling(temperature=kwargs['temperature'] if kwargs['do_sample'] else 0.0)
      texts = tasks.generate_texts(self.model, [c for _, c in members], settings, sampling,
                                   [kwargs['until']] * len(members), self.seed)
      for (i, _), text in zip(members, texts):
        out[i] = text
    return out


def run(model, task_names: list[str], include_path: str | None = None, batch_size: int = 8,
        limit: int | None = None, log_samples: bool = False, **kwargs) -> dict:
  """lm_eval.simple_evaluate on LmlabLM(model): {'results', 'configs', 'versions', ...} as lm-eval returns them
  ('samples' too with log_samples); kwargs go to simple_evaluate (num_fewshot, bootstrap_iters, ...)."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  manager = TaskManager(include_path=include_path) if include_path else None
  output = lm_eval.simple_evaluate(model=LmlabLM(model, batch_size), tasks=task_names, task_manager=manager,
                                   limit=limit, log_samples=log_samples, **kwargs)
  if output is None:
    raise ValueError(f'lm-eval returned nothing for tasks {task_names}')
  return output
