"""CogVLM-17B supervised fine-tuning (chat / VQA / grounding instructions) at 490 px.

Every parameter trains; the EVA2-CLIP ViT at 0.1x the learning rate (`optim.vit_lr_scale`,
applied to the whole AdamW step of the ViT's parameters). Frozen: nothing (so no bf16 frozen
copy; master weights and AdamW moments in fp32 for all ~17.6B parameters). lr 1e-5,
batch 1024, 8000 iterations: our reading of the paper's SFT setup (section 2.3), not
re-checked against its text here — check them before a real run. On fsdp=64 that is 16 rows
per device, run as 16 microbatches of one 2048-token row (the CPU plan: ~12.8 GiB per device;
4 microbatches ~22 GiB). On 256 chips (v5e-256, v6e-256) each chip has 4 rows:
--config.train.grad_accum_steps=4 keeps one row per microbatch (TPU compiler, v5e-256: 5.14
GiB per chip of 16).

    python train.py --config configs/cogvlm_sft.py --workdir runs/sft \
        --config.train.init_from=/path/to/cogvlm-base-490-hf \
        --config.data.mixture.instructions.json=/data/sft/instructions.json \
        --config.data.mixture.instructions.images=/data/sft/images
"""

from configs._recipes import instruction_data, recipe_config


def get_config():
  return recipe_config(preset_name="cogvlm-base-490", recipe="sft", image_size=490,
                       mixture={"instructions": instruction_data()},
                       max_length=2048, lr=1e-5, batch_size=1024, steps=8000,
                       warmup_steps=200, vit_lr_scale=0.1, grad_accum_steps=16)
