"""The jitted train and eval steps: pure functions of (state, batch)."""
import math

import jax
import jax.numpy as jnp
import optax

from lmlab.train import losses
from lmlab.train.state import TrainState


def _forward(model, params, model_state, batch, rngs=None, **kwargs):
  return model.apply({'params': params, **model_state}, batch['inputs'], batch['positions'], batch['segment_ids'],
                     rngs=rngs, **kwargs)


def _token_stats(model, params, model_state, batch, rngs=None):
  """(losses.logit_stats of the batch's targets, aux). With model.loss_vocab_chunk, from the final hidden states a
  vocabulary chunk at a time, so the [B, L, V] logits are never formed.

  A model that cannot hand out its unembedding (a fine-tuning wrapper) takes the logits path: the same numbers.
  """
  chunk = model.config.loss_vocab_chunk
  if chunk and hasattr(model, 'unembedding'):
    hidden_BLD, aux = _forward(model, params, model_state, batch, rngs, return_hidden=True)
    w_DV = model.apply({'params': params}, method='unembedding')
    return losses.chunked_logit_stats(hidden_BLD, w_DV, batch['targets'], chunk), aux
  logits_BLV, aux = _forward(model, params, model_state, batch, rngs)
  return losses.logit_stats(logits_BLV, batch['targets']), aux


def lm_loss_fn(model, z_loss: float):
  """(params, model_state, batch, rng) -> (loss sum, nll sum, aux): weighted token cross-entropy (+ z-loss)."""
  def loss_fn(params, model_state, batch, rng):
    # One 'dropout' stream: the layer scan splits it per layer, and MoE router jitter draws from it too.
    stats, aux = _token_stats(model, params, model_state, batch, rngs={'dropout': rng})
    nll_sum, z_sum, _ = losses.token_sums(stats, batch['targets'], batch['weights'])
    return nll_sum + z_loss * z_sum, nll_sum, aux
  return loss_fn


def make_train_step(model, tx, schedule, config, loss_fn=None):
  """(state, batch) -> (state, metrics); the batch is split into `config.microbatches` for accumulation.

  `loss_fn` (default: the language-model loss) returns sums over the batch's weights, so any task whose
  batch has a `weights` array (per token or per example) trains through this one step.
  """
  num_micro = config.microbatches
  task_loss = loss_fn or lm_loss_fn(model, config.z_loss)

  def micro_loss(params, model_state, micro, rng, num_tokens):
    loss_sum, nll_sum, aux = task_loss(params, model_state, micro, rng)
    # Normalised by the whole batch's weight, so summing microbatch gradients is exact.
    loss = loss_sum / num_tokens + losses.moe_loss(aux) / num_micro
    return loss, (nll_sum, aux)

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    num_tokens = jnp.maximum(jnp.sum(batch['weights']), 1.0)
    # Strided split keeps each device's rows on that device: microbatch i takes rows i, i+m, ...
    micro_batches = jax.tree.map(lambda x: x.reshape(-1, num_micro, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro_and_rng):
      grads, loss, nll = carry
      micro, rng_i = micro_and_rng
      (loss_i, (nll_i, aux)), grads_i = grad_fn(state.params, state.model_state, micro, rng_i, num_tokens)
      return (jax.tree.map(jnp.add, grads, grads_i), loss + loss_i, nll + nll_i), aux

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss, nll_sum), aux = jax.lax.scan(accumulate, zeros, (micro_batches, jax.random.split(step_rng, num_micro)))
    aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    model_state = state.model_state
    if 'router_state' in model_state:
      from lmlab.models import moe  # pylint: disable=g-import-not-at-top
      model_state = moe.update_router_state(model_state, aux, model.config.moe)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, model_state=model_state, rng=rng)
    metrics = {'loss': nll_sum / num_tokens, 'total_loss': loss, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state.step), 'tokens': num_tokens,
               # A task's own metrics arrive namespaced ('dpo/margin'); the model's bare keys are MoE metrics.
               **{k if '/' in k else f'moe/{k}': v for k, v in aux.items()}}
    return new_state, metrics

  return train_step


def make_eval_step(model, token_bytes_V):
  """(params, model_state, batch) -> summed loss, tokens, correct tokens, target bytes and text targets' loss.

  `token_bytes_V` is the tokenizer's `token_bytes()`: a target with bytes is text, one without (EOS, BOS, pad) is
  not, and bits per byte (lmlab/data/tokenizers.py) divides the nats of text targets only by their bytes.
  """
  if token_bytes_V is None:
    raise ValueError('bits per byte needs the UTF-8 bytes of each token, and this tokenizer has none (token_bytes() '
                     'is None: lmlab/data/tokenizers.py lists the decoders it counts); evaluate language models with a '
                     'bytes, byte-level BPE or SentencePiece-style tokenizer')
  token_bytes_V = jnp.asarray(token_bytes_V, jnp.float32)

  def eval_step(params, model_state, batch):
    stats, _ = _token_stats(model, params, model_state, batch)
    nll_sum, _, correct_sum = losses.token_sums(stats, batch['targets'], batch['weights'])
    bytes_BL = token_bytes_V[batch['targets']] * batch['weights']
    # The same per-token numbers summed over text targets only.
    text_nll_sum, _, _ = losses.token_sums(stats, batch['targets'], batch['weights'] * (bytes_BL > 0))
    return {'nll_sum': nll_sum, 'tokens': jnp.sum(batch['weights']), 'correct': correct_sum,
            'bytes': jnp.sum(bytes_BL), 'text_nll_sum': text_nll_sum}

  return eval_step


def summarize_eval(sums) -> dict:
  """Eval metrics from summed counts: loss (nats/token, every target), perplexity, bits per byte (text targets'
  nats over their bytes), token accuracy."""
  loss = sums['nll_sum'] / max(sums['tokens'], 1.0)
  return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 700.0)),
          'eval_bits_per_byte': sums['text_nll_sum'] / (math.log(2.0) * max(sums['bytes'], 1.0)),
          'eval_accuracy': sums['correct'] / max(sums['tokens'], 1.0), 'eval_tokens': sums['tokens']}


def describe_eval(metrics: dict) -> str:
  """One progress line of eval metrics: loss and bits/byte (language models) or accuracy and macro-F1 (classifiers),
  and GRPO's held-out exact match."""
  parts = [f'eval loss {metrics["eval_loss"]:.4f}']
  names = {'eval_bits_per_byte': 'bits/byte', 'eval_accuracy': 'accuracy', 'eval_macro_f1': 'macro-F1',
           'eval_exact_match': 'exact match'}
  shown = ('eval_bits_per_byte',) if 'eval_bits_per_byte' in metrics else ('eval_accuracy', 'eval_macro_f1')
  shown += ('eval_exact_match',)
  return ', '.join(parts + [f'{names[k]} {metrics[k]:.4f}' for k in shown if k in metrics])
