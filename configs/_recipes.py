"""Shared helper of the CogVLM / CogVLM2 training recipe configs (configs/cogvlm_*.py).

`recipe_config(...)` is a complete `train.py` config at real size, configs/base.py with:

* ``model``: a released preset, computing in bf16 with fp32 master weights for the
  trainable parameters (``param_dtype=float32``) and the frozen ones held in bf16
  (``train.frozen_dtype``); remat of each decoder / ViT layer to fit long sequences.
* ``optim``: AdamW with linear warmup and cosine decay, clipping at 1.0.
* ``train``: batch / steps as in the CogVLM paper where it says so (see each recipe);
  ``grad_accum_steps`` splits the global batch into microbatches run in a `lax.scan`.
* ``data``: the recipe's mixture of sources (see `cogvlm_jax.data.mixture`), with the
  dataset locations left empty: point them at your copies on the command line, e.g.
  ``--config.data.mixture.laion.paths='gs://bucket/laion2b/*.tar'``, and the tokenizer
  (``data.tokenizer``, default: the ``train.init_from`` folder). The sequence length is
  real (it sets the step's shapes, e.g. for `python -m cogvlm_jax.plan`).

The numbers taken from the CogVLM paper (arXiv 2311.03079, section 2.2) are marked "paper";
the rest (warmup, weight decay, microbatching, mesh) are our defaults.
"""

from __future__ import annotations

import ml_collections

from cogvlm_jax.config import preset
from configs import base


# LAION-2B / COYO filters in the spirit of the paper's cleaning (size, aspect 1/6..6, CLIP
# similarity, safety and watermark scores where the parquet has them).
PRETRAIN_FILTERS = dict(min_image_size=224, max_aspect_ratio=6.0, min_similarity=0.28,
                        max_punsafe=0.5, max_pwatermark=0.8)


def caption_shards(weight: float = 1.0) -> dict:
  """LAION-style caption shards (img2dataset output): set `paths` to your copy."""
  return dict(kind="webdataset", paths="", task="caption", weight=weight,
              filters=dict(PRETRAIN_FILTERS))


def grounding_shards(weight: float = 1.0) -> dict:
  """Shards with referring expressions + boxes in their .json (GRIT-style or "refs")."""
  return dict(kind="webdataset", paths="", task="grounding", weight=weight,
              filters=dict(min_image_size=224, max_aspect_ratio=6.0))


def instruction_data(weight: float = 1.0) -> dict:
  """LLaVA-format instruction JSON + image folder (multi-turn; loss on every answer)."""
  return dict(kind="llava", json="", images="", weight=weight)


def recipe_config(*, preset_name: str, recipe: str, image_size: int | None, max_length: int,
                  lr: float, batch_size: int, steps: int, warmup_steps: int,
                  mixture: dict, vit_lr_scale: float = 0.1, grad_accum_steps: int = 1,
                  init_from: str = "", remat_policy: str = "full",
                  end_lr_ratio: float = 0.01) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.recipe = recipe
  vision = {} if image_size is None else dict(image_size=image_size)
  c.model = preset(preset_name, dtype="bfloat16", param_dtype="float32",
                   remat_policy=remat_policy, vision=vision).to_dict()
  c.data.update(dict(source="mixture", max_length=max_length, num_threads=16, prefetch=4,
                     max_bad_ratio=0.05, bad_min_samples=10_000))
  c.data.mixture = mixture
  c.optim.update(dict(lr=lr, warmup_steps=warmup_steps, end_lr_ratio=end_lr_ratio, b2=0.95,
                      weight_decay=0.05, vit_lr_scale=vit_lr_scale))
  c.train.update(dict(batch_size=batch_size, steps=steps, log_every=10, checkpoint_every=1000,
                      max_checkpoints=3, grad_accum_steps=grad_accum_steps, z_loss=1e-4,
                      max_nan_steps=20, frozen_dtype="bfloat16", init_from=init_from))
  c.eval.update(dict(batch_size=batch_size, max_new_tokens=32, max_examples_per_task=200))
  return c
