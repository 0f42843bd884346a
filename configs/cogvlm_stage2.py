"""CogVLM-17B pretraining stage 2: captions mixed with referring expression comprehension
(REC: region description -> box), starting from stage 1, with the 224 -> 490 px switch.

Same trainable set as stage 1 (visual experts + adapter; the ViT stays frozen). Paper: 60k
iterations at batch 1024, the last 30k at 490 x 490. One run does both: at step 30000
(`train.resolution_switch`) the frozen ViT position table (257 rows) is resized bicubically
to 1226 rows, the sequence grows to hold the 1227-token image span, the step is recompiled
and training goes on with the same optimizer state, learning-rate schedule and data stream.

    python train.py --config configs/cogvlm_stage2.py --workdir runs/stage2 \
        --config.train.init_from=runs/stage1 --config.data.tokenizer=/models/vicuna-7b \
        --config.data.mixture.laion.paths='gs://bucket/laion2b/*.tar' \
        --config.data.mixture.grounding.paths='gs://bucket/grounding/*.tar'

lr 3e-5 with 300 warmup steps and cosine decay is our choice (the paper does not say).
"""

from configs._recipes import caption_shards, grounding_shards, recipe_config


def get_config():
  c = recipe_config(preset_name="cogvlm-base-490", recipe="stage2", image_size=224,
                    # Image-caption pairs mixed with REC (region description -> box); point
                    # `paths` at LAION-style caption shards and at grounding shards.
                    mixture={"laion": caption_shards(0.5), "grounding": grounding_shards(0.5)},
                    max_length=384,  # BOS + 258 image-span tokens + caption or REC text
                    lr=3e-5, batch_size=1024, steps=60_000, warmup_steps=300)
  # BOS + 1227 image-span tokens + text; 4 microbatches keep the 490 px step in memory: 4 rows
  # per chip per microbatch on 64 chips. On 256 chips (v5e-256, v6e-256) each chip has 4 rows:
  # --config.train.resolution_switch.grad_accum_steps=1 (TPU compiler, `plan --after_switch`,
  # v5e-256: 5.49 GiB per chip of 16).
  c.train.resolution_switch = dict(step=30_000, image_size=490, max_length=1360,
                                   grad_accum_steps=4)
  return c
