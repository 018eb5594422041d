"""Every experiment key, declared once with its default and meaning; presets override a few.

The model section is generated from lmlab.models.ModelConfig, so the dataclass stays the single
source of truth for model keys (their comments live there).
"""
import dataclasses

import ml_collections

from lmlab.models import ModelConfig
from lmlab.sharding import DEFAULT_RULES


def _config_dict(dataclass_instance) -> ml_collections.ConfigDict:
  values = {}
  for field in dataclasses.fields(dataclass_instance):
    value = getattr(dataclass_instance, field.name)
    values[field.name] = _config_dict(value) if dataclasses.is_dataclass(value) else value
  return ml_collections.ConfigDict(values)


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # params, dropout and data order
  c.steps = 1000                  # optimizer steps
  c.batch_size = 16               # global batch, in sequences
  c.seq_len = 256                 # tokens per sequence
  c.microbatches = 1              # gradient accumulation: batch_size is split into this many
  c.learning_rate = 3e-4          # peak learning rate
  c.min_lr_ratio = 0.1            # cosine decays to learning_rate * min_lr_ratio
  c.warmup_steps = 100
  c.weight_decay = 0.1
  c.decay_embeddings = False      # apply weight decay to embedding tables too
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.adam_eps = 1e-8
  c.grad_clip = 1.0               # global-norm clip; 0 disables
  c.z_loss = 0.0                  # output z-loss weight: z * mean(logsumexp(logits)^2)
  c.log_every = 10                # steps between train metric rows
  c.eval_every = 100              # steps between evaluations; 0 disables
  c.eval_batches = 8              # validation batches per evaluation
  c.eval_at_start = False         # also evaluate before the first step of a fresh run: a fine-tune's starting point
  c.eval_tasks = ''               # comma-separated mc:FILE.jsonl / gen:FILE.jsonl (lmlab/eval/tasks.py) run at every
                                  # evaluation on decoders; metrics as eval/<task>/<metric> (one process only)
  c.checkpoint_every = 200        # steps between checkpoints; 0 disables
  c.keep_checkpoints = 3          # newest N checkpoints kept, plus the one with the best eval loss
  c.restore = 'latest'            # latest (newest intact checkpoint of this run, else a fresh start) | none
                                  # (fresh start; this run's checkpoints are moved aside) | STEP (that step
                                  # of this run; newer ones are moved aside) | PATH (a checkpoint step dir,
                                  # checkpoints dir or workdir of another run, used while this run has none)
  c.init_from = ''                # pretrained weights for a fresh start: HF dir, .gguf, lmlab Orbax export, or a
                                  # run's workdir (latest intact checkpoint; WORKDIR@best, WORKDIR@STEP); ignored
                                  # when a checkpoint is resumed
  c.verify_checkpoints = True     # check each restored array against the digest recorded when it was saved (one
                                  # pass over the state on device); false skips the check (digests are still saved)
  c.progress = True               # console progress bar

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices left over
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1
  c.sharding_rules = [list(rule) for rule in DEFAULT_RULES]  # logical name -> mesh axes

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'        # stdlib (offline default corpus) | tfds:NAME[:VERSION] | files:GLOB (.txt,
                                  # .jsonl, .jsonl.gz; '{split}' in GLOB is replaced by the split name, else
                                  # documents are split by path hash like stdlib)
  c.data.mixture = ''             # weighted sources 'SOURCE:WEIGHT,...', e.g. 'stdlib:0.7,files:/d/*.jsonl:0.3':
                                  # each document's source drawn with these odds; set, it replaces data.source
  c.data.tokenizer = 'bytes'      # bytes | hf:PATH/tokenizer.json | spm:PATH.model | bpe:VOCAB_SIZE (byte-level
                                  # BPE trained on the train split on first use, kept as WORKDIR/tokenizer.json)
  c.data.train_split = 'train'    # split names; tfds takes its own (e.g. 'train[:90%]'), stdlib/files train|validation
  c.data.eval_split = 'validation'
  c.data.validation_fraction = 0.05  # stdlib, files: share of documents (by path hash) held out
  c.data.text_key = 'text'        # tfds feature / jsonl field holding a document's text
  c.data.tfds_data_dir = ''       # tfds: where prepared datasets live; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.tfds_download = False    # tfds: download and prepare a missing dataset (needs internet, often TensorFlow)
  c.data.txt_split_blank_lines = False  # files: each blank-line-separated block of a .txt is a document
  c.data.on_bad_record = 'error'  # files: malformed jsonl line or missing field: error | skip (counted, logged)
  c.data.shuffle_window = 1024    # train rows permuted together; a restore re-packs at most this many
  c.data.prefetch = 2             # batches prepared ahead in a background thread; 0 = none

  c.finetune = ml_collections.ConfigDict()
  c.finetune.task = ''            # '' (pretraining) | classify (encoder + head) | sft (decoder, loss on responses)
                                  # | dpo (decoder, preference pairs) | reward (scalar head, preference pairs)
                                  # | grpo (decoder, {prompt, answer} rows, rewards of its own samples: c.grpo);
                                  # with a task, the model comes from init_from (model.* then only sets
                                  # compute_dtype, param_dtype, remat, attention, dropout)
  c.finetune.dataset = 'stdlib'   # stdlib (offline: classify = stdlib docstrings by package, sft = "what does
                                  # function X do?" -> its docstring summary) | files:GLOB (.jsonl; '{split}' in
                                  # GLOB picks files per split) | tfds:NAME (classify only); text in data.text_key
                                  # | arithmetic (sft, grpo: "What is a + b?" -> its value, a, b in 0..19, +/-)
  c.finetune.label_key = 'label'  # classify: jsonl/tfds field with the label (int or string)
  c.finetune.prompt_key = 'prompt'      # sft, dpo, reward: jsonl field with the user's prompt (dpo and reward
                                        # rows also have 'chosen' and 'rejected' replies)
  c.finetune.response_key = 'response'  # sft: jsonl field with the reply the loss is taken on
  c.finetune.pooling = 'mean'     # classify, reward: mean (over non-padding tokens) | pooler (BERT dense+tanh on [CLS],
                                  # initialised from the checkpoint's pooler when it has one)
  c.finetune.method = 'lora'      # lora (adapters + head trained, the rest frozen) | full (every weight trained)
  c.finetune.lora_rank = 8        # r of A [in, r] and B [r, out]
  c.finetune.lora_alpha = 16.0    # adapted weight W + (alpha / r) * A @ B
  c.finetune.lora_targets = 'attn/(query|value)'  # regex searched in kernel paths like layers/block_0/attn/query
  c.finetune.dpo_beta = 0.1        # dpo: strength of the pull to the reference (implicit reward = beta * log-ratio)
  c.finetune.dpo_loss = 'sigmoid'  # dpo: sigmoid (DPO; with label smoothing: conservative DPO) | ipo | hinge
  c.finetune.dpo_label_smoothing = 0.0  # dpo sigmoid: assumed share of flipped preference labels, in [0, 0.5)
  c.finetune.export = True        # at the end, write merged weights (LoRA folded in) to WORKDIR/export (Orbax)

  c.grpo = ml_collections.ConfigDict()  # finetune.task=grpo: each step samples, scores and learns from a rollout
  c.grpo.group_size = 4           # G samples per prompt (>= 2); batch_size / G prompts per step
  c.grpo.max_new_tokens = 16      # sampled tokens per completion (prompt + completion must fit seq_len)
  c.grpo.temperature = 1.0        # sampling temperature of the rollouts (evaluation is greedy)
  c.grpo.top_p = 1.0              # nucleus sampling of the rollouts; 1: off
  c.grpo.rewards = 'exact_match'  # comma-separated reward functions (lmlab/finetune/reward_functions.py), summed:
                                  # exact_match | numeric | format:REGEX | reward_model:PATH | module:function
  c.grpo.answer_key = 'answer'    # jsonl field with the reference answer the rewards compare to
  c.grpo.epsilon_low = 0.2        # clipped ratio's lower bound 1 - epsilon_low
  c.grpo.epsilon_high = 0.2       # and upper bound 1 + epsilon_high (DAPO: 0.28)
  c.grpo.beta = 0.04              # weight of the k3 KL to the reference (the starting model); 0: logged only
  c.grpo.normalization = 'token'  # token (mean over every response token) | sequence (per response, then mean)
  c.grpo.scale_rewards = True     # divide advantages by the group's std (False: Dr. GRPO, centred only)
  c.grpo.max_kl = 0.0             # stop when a step's mean KL to the reference exceeds this; 0: never
  c.grpo.eval_prompts = 64        # held-out prompts answered greedily at each evaluation (eval_exact_match)

  c.model = _config_dict(ModelConfig())
  return c
