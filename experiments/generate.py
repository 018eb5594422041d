"""Generate text: python -m experiments.generate --pretrained=PATH --prompt=TEXT [--prompt=TEXT ...]
[--max_new_tokens=64 --temperature=0 --top_k=0 --top_p=1 --seed=0 --chat].

PATH is anything lmlab.convert.load_model reads, a run's workdir included (--workdir=DIR is the same).
"""
import time

from absl import flags

from experiments import cli

_PRETRAINED = flags.DEFINE_string('pretrained', None, 'HF directory, .gguf file, lmlab Orbax export, or a run\'s '
                                  'workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Alias of --pretrained for a training or fine-tuning run\'s workdir.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt text; repeat the flag for a batch.', required=True)
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens generated per prompt at most (EOS stops a row).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy; otherwise softmax temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0: no cut.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1: no cut.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_CHAT = flags.DEFINE_bool('chat', False, 'Wrap each prompt in the model\'s chat template (instruct models).')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Activation dtype.')
_VERIFY = flags.DEFINE_bool('verify_checkpoints', True, 'Check a workdir checkpoint\'s arrays against their digests.')


def main(argv):
  del argv
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab import convert, generate  # pylint: disable=g-import-not-at-top
  from lmlab.finetune import chat  # pylint: disable=g-import-not-at-top
  if bool(_PRETRAINED.value) == bool(_WORKDIR.value):
    raise ValueError('pass exactly one of --pretrained=PATH and --workdir=DIR (its alias)')
  model = convert.load_model(_PRETRAINED.value or _WORKDIR.value, verify=_VERIFY.value)
  what, tokenizer = model.source, model.tokenizer
  if model.config.family != 'decoder':
    raise ValueError(f'{what} is an {model.config.family}; generation needs a causal decoder')
  if tokenizer is None:
    raise ValueError(f'{what} has no tokenizer to encode --prompt with')
  config = dataclasses.replace(model.config, compute_dtype=_DTYPE.value)
  texts = [chat.render(tokenizer, [{'role': 'user', 'content': p}], add_generation_prompt=True) if _CHAT.value
           else p for p in _PROMPT.value]
  prompts = [tokenizer.encode(t) for t in texts]
  sampling = generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  eos_ids, pad_id = generate.stop_ids(tokenizer), tokenizer.pad_id or 0
  tokens_BP, lengths_B = generate.left_pad(prompts, pad_id)
  variables = jax.device_put(model.variables)
  fn = generate.make_generate(config, _MAX_NEW.value, sampling, eos_ids, pad_id)
  args = (variables, tokens_BP, lengths_B, jax.random.key(_SEED.value))
  print(f'{what}: {len(prompts)} prompt(s) of {tokens_BP.shape[1]} tokens (left-padded), compiling...', flush=True)
  start = time.time()
  compiled = fn.lower(*args).compile()
  print(f'compiled in {time.time() - start:.1f}s; generating up to {_MAX_NEW.value} tokens per prompt', flush=True)
  start = time.time()
  out_BN, count_B = jax.device_get(compiled(*args))
  seconds = time.time() - start
  for text, row, n in zip(_PROMPT.value, out_BN, count_B):
    print(f'--- prompt: {text}\n{tokenizer.decode([i for i in row[:n] if i < tokenizer.vocab_size])}')
  total = int(count_B.sum())
  print(f'{total} new tokens in {seconds:.2f}s (prefill included): {total / seconds:.1f} tokens/s, '
        f'batch {len(prompts)}, {config.compute_dtype}, {jax.devices()[0].platform}')


if __name__ == '__main__':
  cli.run(main)
