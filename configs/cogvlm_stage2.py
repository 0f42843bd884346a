"""CogVLM-17B pretraining stage 2: captions mixed with referring expression comprehension
(REC: region description -> box), starting from stage 1, with the 224 -> 490 px switch.

Same trainable set as stage 1 (visual experts + adapter). Paper: 60k iterations at batch 1024,
of which the last 30k at 490 x 490. The switch is two runs of this config:

    # phase A: iterations 1..30000 at 224 px, from the stage-1 weights
    python train.py --config configs/cogvlm_stage2.py --workdir runs/stage2_224 \
        --config.train.init_from=runs/stage1 --config.data.tokenizer=... \
        --config.data.mixture.laion.paths='gs://bucket/laion2b/*.tar' \
        --config.data.mixture.grounding.paths='gs://bucket/grounding/*.tar'
    # phase B: 30k more at 490 px; the ViT position table (257 rows) is resized bicubically
    # to 1226 rows when the phase-A weights are loaded
    python train.py --config configs/cogvlm_stage2.py:490 --workdir runs/stage2_490 \
        --config.train.init_from=runs/stage2_224

The argument after ':' picks the phase ("224", the default, or "490").
"""

from configs._recipes import caption_shards, grounding_shards, recipe_config


def get_config(phase: str = "224"):
  if phase not in ("224", "490"):
    raise ValueError(f"phase must be '224' or '490', got {phase!r}")
  size = int(phase)
  c = recipe_config(preset_name="cogvlm-base-490", recipe="stage2", image_size=size,
                    # Image-caption pairs mixed with REC (region description -> box); point
                    # `paths` at LAION-style caption shards and at grounding shards.
                    mixture={"laion": caption_shards(0.5), "grounding": grounding_shards(0.5)},
                    # BOS + image span (258 / 1227) + caption or REC query and box
                    max_length=384 if size == 224 else 1360,
                    lr=1e-5 if size == 490 else 3e-5, batch_size=1024, steps=30_000,
                    warmup_steps=300 if size == 224 else 100,
                    grad_accum_steps=1 if size == 224 else 4)
  return c
