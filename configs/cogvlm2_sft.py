"""CogVLM2-19B (Llama-3-8B + EVA2-CLIP-E, 1344 px) supervised fine-tuning.

Recipe "sft": every parameter trains, the ViT at 0.1x the learning rate. A full fine-tune
(ViT at 1x) is `--config.recipe=full`. The CogVLM2 release gives no training recipe; these
are our defaults (lr 1e-5, batch 256, 4000 steps, seq 4096 = 2306 image-span tokens + text).

    python train.py --config configs/cogvlm2_sft.py --workdir runs/cogvlm2_sft \
        --config.train.init_from=/path/to/cogvlm2-llama3-chat-19B \
        --config.data.mixture.instructions.json=/data/sft/instructions.json \
        --config.data.mixture.instructions.images=/data/sft/images
    python -m cogvlm_jax.plan --config configs/cogvlm2_sft.py --mesh fsdp=64
"""

from configs._recipes import instruction_data, recipe_config


def get_config():
  return recipe_config(preset_name="cogvlm2-llama3-chat-19b", recipe="sft", image_size=None,
                       mixture={"instructions": instruction_data()},
                       max_length=4096, lr=1e-5, batch_size=256, steps=4000,
                       warmup_steps=100, vit_lr_scale=0.1,
                       # 256 rows on fsdp=64: 4 per device in 4 microbatches of one row
                       # (`python -m cogvlm_jax.plan`: ~25 GiB per device; 2 microbatches
                       # ~35 GiB, 1 ~55 GiB)
                       grad_accum_steps=4)
