"""Chat formatting: the model's own chat template (jinja2, as transformers renders it) or a plain fallback.

Without jinja2, or for a tokenizer with no template, prompts become ChatML when the vocabulary has
`<|im_start|>` and `User: ...\\nAssistant: ` otherwise (documented in BUILD_NOTES); both are what
`sft_example` trains on, so a model fine-tuned here is prompted the way it was taught.
"""
import functools
import importlib.util
from typing import Sequence


def _has_token(tokenizer, token: str) -> bool:
  inner = getattr(tokenizer, 'tokenizer', None)
  return inner is not None and hasattr(inner, 'token_to_id') and inner.token_to_id(token) is not None


def _fallback(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
  if _has_token(tokenizer, '<|im_start|>'):
    text = ''.join(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n' for m in messages)
    return text + ('<|im_start|>assistant\n' if add_generation_prompt else '')
  names = {'user': 'User', 'assistant': 'Assistant', 'system': 'System'}
  text = ''.join(f'{names.get(m["role"], m["role"])}: {m["content"]}\n' for m in messages)
  return text + ('Assistant: ' if add_generation_prompt else '')


def _token_text(tokenizer, token_id) -> str:
  inner = getattr(tokenizer, 'tokenizer', None)
  return inner.id_to_token(token_id) if inner is not None and token_id is not None else ''


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """A template compiled once (rendering thousands of SFT examples must not recompile it each time)."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise ValueError(f'chat template refused the messages: {message}')

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
  env.globals['raise_exception'] = raise_exception
  return env.from_string(template)


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
  """Messages ({'role', 'content'}) as the text the model was trained on."""
  template = getattr(tokenizer, 'chat_template', None)
  if not template or importlib.util.find_spec('jinja2') is None:
    return _fallback(tokenizer, messages, add_generation_prompt)
  return _compiled(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt,
      bos_token=_token_text(tokenizer, getattr(tokenizer, 'bos_id', None)),
      eos_token=_token_text(tokenizer, getattr(tokenizer, 'eos_id', None)))


def encode_continuation(tokenizer, text: str) -> list[int]:
  """Ids of text that follows other text: no BOS even when the tokenizer adds one to a prompt."""
  ids = tokenizer.encode(text)
  if getattr(tokenizer, 'add_bos', False) and ids[:1] == [tokenizer.bos_id]:
    ids = ids[1:]
  return ids


def sft_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[float]]:
  """(ids, loss weights) of one prompt/response pair: weight 1 on the response tokens only.

  The prompt is the chat rendering up to the assistant's turn; the response is the rest of the
  rendering of the whole exchange (so its end-of-turn token is learned too), plus EOS when the
  rendering has no end-of-turn of its own.
  """
  user = [{'role': 'user', 'content': prompt}]
  prefix = render(tokenizer, user, add_generation_prompt=True)
  full = render(tokenizer, user + [{'role': 'assistant', 'content': response}], add_generation_prompt=False)
  if not full.startswith(prefix):
    raise ValueError('the chat template renders the prompt differently with and without the reply; '
                     'cannot tell prompt tokens from response tokens')
  prompt_ids = tokenizer.encode(prefix)
  response_ids = encode_continuation(tokenizer, full[len(prefix):])
  if tokenizer.eos_id is not None and tokenizer.eos_id not in response_ids:
    response_ids.append(tokenizer.eos_id)
  return prompt_ids + response_ids, [0.0] * len(prompt_ids) + [1.0] * len(response_ids)
