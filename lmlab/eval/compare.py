"""Two models on the same task examples: per-metric difference with a paired bootstrap 95% interval and, for 0/1
outcomes (accuracies, exact match), McNemar's exact p. Each model scores with its own tokenizer; the result says
whether the tokenizers were the same (with different ones, token-level numbers are not comparable, bytes are)."""
from lmlab.eval import stats, tasks

DIFFERENT_TOKENIZERS = ('the models have different tokenizers: each scored with its own, so per-token numbers '
                        '(loss, perplexity) are not comparable; accuracies, exact match and bits per byte are')


def same_tokenizer(a, b) -> bool:
  """Whether two tokenizers encode alike: same kind, special ids and vocabulary (the serialized Hugging Face
  tokenizer or SentencePiece model, not the file it came from: two exports of one tokenizer are the same)."""
  return _identity(a) == _identity(b)


def _identity(t) -> tuple:
  hf, spm = getattr(t, 'tokenizer', None), getattr(t, 'sp', None)
  body = hf.to_str() if hf is not None else spm.serialized_model_proto() if spm is not None else None
  return (type(t).__name__, t.vocab_size, t.eos_id, t.bos_id, getattr(t, 'pad_id', None),
          getattr(t, 'add_bos', False), body)


def compare(kind: str, samples_a: list[dict], samples_b: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
  """{metric: paired_comparison(A, B)} over the examples both evaluated, matched by their file line."""
  lines_a, lines_b = [s['line'] for s in samples_a], [s['line'] for s in samples_b]
  if lines_a != lines_b:
    raise ValueError('the two models were evaluated on different examples (file lines differ); '
                     'evaluate both on the same task file')
  outcomes_a, outcomes_b = tasks.outcomes(kind, samples_a), tasks.outcomes(kind, samples_b)
  return {name: stats.paired_comparison(outcomes_a[name], outcomes_b[name], n_boot=n_boot, seed=seed)
          for name in outcomes_a if name in outcomes_b}

