"""The demo run: a tiny CogVLM trained from scratch on rendered shapes, in minutes on a CPU.

    python train.py --config configs/demo.py --workdir runs/demo

Data (scenes, captions, VQA, grounding boxes and a 512-piece tokenizer) is generated into
`data/demo/` on first use. Override anything on the command line, e.g.
`--config.train.steps=200 --config.recipe=stage1`.
"""

import ml_collections

from cogvlm_jax.config import preset
from cogvlm_jax.data.demo import VOCAB_SIZE


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.recipe = "full"  # "full" | "stage1" (visual experts + adapter only)

  # A CogVLM (v1) with toy sizes: 32px images in 8px patches -> 16 image tokens (+boi/eoi).
  c.model = preset(
      "tiny-cogvlm", vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
      template_version="base", dtype="float32", param_dtype="float32",
      init_std=0.08,  # ~1/sqrt(hidden): with 0.02 (right for 4096 wide) the image is ignored
      vision=dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                  num_heads=4, intermediate_size=128),
  ).to_dict()

  c.data = ml_collections.ConfigDict(dict(
      # "demo": train on data.dir's train split (generated on first use). Any other data:
      # source="mixture" with data.mixture = {name: spec} (cogvlm_jax/data/mixture.py).
      source="demo",
      dir="data/demo",  # relative to the working directory; generated on first use
      num_train_scenes=3000,  # x4 records each: caption, 2 VQA, grounding
      num_eval_scenes=150,
      render_size=64,
      generator_seed=0,
      shuffle_seed=0,
      max_length=48,  # BOS + 18 image-span tokens + prompt + answer + EOS <= 45
      num_threads=2,  # decode/resize/tokenize threads (Pillow releases the GIL)
      num_workers=0,  # > 0: worker processes instead (Grain mp_prefetch), for many cores
      prefetch=8,
      max_bad_ratio=0.1,  # stop when more than 10% of the samples are bad ...
      bad_min_samples=500,  # ... after at least this many
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, end_lr_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.01, clip_norm=1.0))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=16, steps=1200, log_every=20, checkpoint_every=100, max_checkpoints=2,
      async_checkpoint=True,
      grad_accum_steps=1,  # microbatches per step (gradient accumulation in a lax.scan)
      z_loss=0.0,  # weight of the z-loss (mean squared logsumexp of the logits); 0 = off
      max_nan_steps=10,  # non-finite steps are skipped; stop after this many
      peak_flops_per_device=0.0,  # MFU denominator; 0 = data-sheet (TPU/GPU) / measured (CPU)
      tensorboard=True,  # TensorBoard event files in WORKDIR/tensorboard (needs tensorboardX)
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=50, max_new_tokens=20, max_examples_per_task=0))  # 0 = all
  return c
