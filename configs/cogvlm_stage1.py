"""CogVLM-17B pretraining stage 1: image-caption loss at 224 px.

Trains the visual experts of every decoder layer and the adapter (GLU + boi/eoi); the
Vicuna-7B language model and the EVA2-CLIP-E ViT are frozen (held in bf16, no optimizer
state, no weight gradients). Paper: 120k iterations, batch 8192, caption loss on
LAION-2B/COYO-700M (1.5B pairs), 224 x 224. lr 1e-4 with 1% warmup is our choice.

    python train.py --config configs/cogvlm_stage1.py --workdir runs/stage1 \
        --config.train.init_from=/path/to/vicuna+eva-init --config.data.tokenizer=... \
        --config.data.mixture.laion.paths='gs://bucket/laion2b/*.tar'
    python -m cogvlm_jax.plan --config configs/cogvlm_stage1.py --topology v5p-128
"""

from configs._recipes import caption_shards, recipe_config


def get_config():
  return recipe_config(preset_name="cogvlm-base-224", recipe="stage1", image_size=224,
                       max_length=384,  # BOS + 258 image-span tokens + caption (<=125 tokens)
                       mixture={"laion": caption_shards()},  # + e.g. "coyo": caption_shards()
                       lr=1e-4, batch_size=8192, steps=120_000, warmup_steps=1200,
                       # 8192 rows on fsdp=64: 128 per chip in 32 microbatches of 4
                       # (TPU compiler, v5p-128: 6.07 GiB per chip; the CPU plan said 8.3,
                       # and ~62 GiB for 1 microbatch). On 256 chips (v5e-256, v6e-256)
                       # --config.train.grad_accum_steps=8 keeps 4 rows per microbatch
                       # (v5e-256: 2.47 GiB per chip of 16).
                       grad_accum_steps=32)
