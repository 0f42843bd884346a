"""Every train.py setting, with its default and what it does: the one place defaults live.

Each run config (configs/demo.py, the recipes through configs/_recipes.py) starts from
`get_config()` and changes what it needs; `cogvlm_jax.training.run_config.validate` refuses a
config with a field this file does not know (a typo) or without one it defines, before
anything is built. Override any field on the command line: `--config.train.steps=300`.
"""

import ml_collections

from cogvlm_jax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, dropout-free training rng, everything random but the data
  # Which parameters train (cogvlm_jax/training/state.py): "full" (all), "stage1" / "stage2"
  # (visual experts + adapter; LM and ViT frozen), "sft" (all, the ViT at optim.vit_lr_scale),
  # "cogagent" (CogAgent's cross module + visual experts; LM, low-res ViT and adapter frozen).
  c.recipe = "full"
  # Every field of cogvlm_jax.config.CogVLMConfig (a preset's to_dict()); the run config sets it.
  c.model = ml_collections.ConfigDict()
  # Device mesh sizes per axis (cogvlm_jax/sharding.py); -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # Logical axis -> mesh axis (a name, a tuple of names, or None = replicated); starts as
  # sharding.DEFAULT_RULES. E.g. --config.sharding_rules.mlp=None replicates the MLP width.
  # Not type-safe: an entry may change between a name, a tuple of names and None.
  c.sharding_rules = ml_collections.ConfigDict(dict(DEFAULT_RULES), type_safe=False)

  c.data = ml_collections.ConfigDict(dict(
      # "demo": the generated demo data in data.dir (train split); "mixture": data.mixture.
      source="demo",
      # {name: source spec} (cogvlm_jax/data/mixture.py documents every field); None = the
      # demo's train split.
      mixture=None,
      # Folder with tokenizer.model / tokenizer.json, or the file; "" = the demo folder, else
      # train.init_from.
      tokenizer="",
      max_length=48,  # tokens per training row: BOS + image span + prompt + answer + EOS
      shuffle_seed=0,  # the data order (a resume refuses another)
      num_threads=2,  # decode / resize / tokenize threads (Pillow releases the GIL)
      num_workers=0,  # > 0: decode in that many worker processes instead (Grain mp_prefetch)
      prefetch=8,  # batches prepared ahead
      max_bad_ratio=0.1,  # stop (exit 4) when more than this share of the samples is bad ...
      bad_min_samples=500,  # ... once this many samples have been built
      jpeg_draft=False,  # faster JPEG decoding at reduced DCT scale (pixels differ slightly)
      # The demo data (data.source = "demo"), generated into data.dir on first use:
      dir="data/demo",  # relative to the working directory
      num_train_scenes=3000,  # x4 records each: caption, 2 VQA, grounding
      num_eval_scenes=150,
      render_size=64,  # rendered PNG side; the pipeline resizes to the model's image size
      generator_seed=0,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,  # peak learning rate, reached after warmup_steps (linear), then cosine decay
      warmup_steps=100,
      end_lr_ratio=0.05,  # the cosine ends at lr * end_lr_ratio at train.steps
      b1=0.9, b2=0.98, eps=1e-8,  # AdamW
      weight_decay=0.01,  # on matrices only (not norms, biases, boi/eoi, CLS)
      clip_norm=1.0,  # global gradient-norm clipping
      vit_lr_scale=0.1,  # recipe "sft": the ViT trains at this times the lr
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=16,  # global rows per step; a multiple of mesh data * fsdp
      steps=1200,
      log_every=20,  # one log line / metrics.jsonl record per this many steps
      checkpoint_every=100,  # Orbax save interval (and always at the end / on SIGTERM)
      max_checkpoints=2,  # newest checkpoints kept (>= 1)
      async_checkpoint=True,  # write checkpoints in the background while training goes on
      grad_accum_steps=1,  # microbatches per step (gradient accumulation in a lax.scan)
      z_loss=0.0,  # weight of the z-loss (mean squared logsumexp of the logits); 0 = off
      max_nan_steps=10,  # steps with a non-finite loss are skipped; stop (exit 3) after this many
      peak_flops_per_device=0.0,  # MFU denominator; 0 = data-sheet (TPU/GPU) / measured (CPU)
      tensorboard=True,  # TensorBoard event files in WORKDIR/tensorboard
      frozen_dtype="",  # dtype of the frozen weights ("bfloat16"); "" = model.param_dtype
      init_from="",  # starting weights: HF folder, converted checkpoint or a training workdir
      # How hosts split the data: "records" (each reads its own share of the records: batches
      # depend on the process count) or "rows" (each reads the global batch stream and keeps
      # its rows: the same batches, so the same losses, for any process count).
      host_data="records",
      # CogVLM stage 2's mid-run switch: dict(step=N, image_size=490, max_length=...,
      # grad_accum_steps=...) trains steps N+1.. at the new size; None = off.
      resolution_switch=None,
      # LoRA (cogvlm_jax/modeling/lora.py): dict(rank=16, alpha=32, dropout=0.05, targets=[
      # "vision_expert_query_key_value", ...]) trains only adapters on those modules (every
      # base weight frozen); targets: lora.TARGETS. QLoRA: base_dtype="int8" stores the frozen
      # projection kernels quantized per output channel (modeling/quantize.py).
      # None = off.
      lora=None,
  ))

  # The end-of-run evaluation on the demo's held-out split: configs/eval/demo.py run on the
  # trained model (the code and numbers of `eval.py --config configs/eval/demo.py`). These
  # replace that config's fields when set; 0 = its value.
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=0,  # a multiple of mesh data * fsdp
      max_new_tokens=0,
      max_examples_per_task=0,
  ))
  return c
