"""CogVLM2-19B (Llama-3-8B + EVA2-CLIP-E, 1344 px) supervised fine-tuning.

Recipe "sft": every parameter trains, the ViT at 0.1x the learning rate. A full fine-tune
(ViT at 1x) is `--config.recipe=full`. The CogVLM2 release gives no training recipe; these
are our defaults (lr 1e-5, batch 256, 4000 steps, seq 4096 = 2306 image-span tokens + text).

    python train.py --config configs/cogvlm2_sft.py --workdir runs/cogvlm2_sft \
        --config.train.init_from=/path/to/cogvlm2-llama3-chat-19B \
        --config.data.mixture.instructions.json=/data/sft/instructions.json \
        --config.data.mixture.instructions.images=/data/sft/images
    python -m cogvlm_jax.plan --config configs/cogvlm2_sft.py --topology v4-128
    python -m cogvlm_jax.plan --config configs/cogvlm2_sft.py --topology v5e-256 \
        --config.train.grad_accum_steps=1
"""

from configs._recipes import instruction_data, recipe_config


def get_config():
  return recipe_config(preset_name="cogvlm2-llama3-chat-19b", recipe="sft", image_size=None,
                       mixture={"instructions": instruction_data()},
                       max_length=4096, lr=1e-5, batch_size=256, steps=4000,
                       warmup_steps=100, vit_lr_scale=0.1,
                       # Memory (TPU compiler, `python -m cogvlm_jax.plan --topology`):
                       # one 4096-token row per chip per microbatch. On 64 chips (v4-128,
                       # v5p-128; fsdp=64) that is 4 microbatches: 18.54 GiB per chip on
                       # v4-128. On 256 chips (v5e-256, v6e-256) each chip holds one row:
                       # --config.train.grad_accum_steps=1, 14.45 GiB of v5e's 16
                       # (v6e-256: 14.16 GiB of 32).
                       # The largest buffers (XLA's buffer assignment) are the loss's:
                       # the row's fp32 logits, [4096, 128256] = 1.96 GiB, and two more
                       # fp32 arrays of that size (the cross-entropy's intermediates and
                       # gradient), beside the all-gathered bf16 lm_head [4096, 128256]
                       # and its gradient (1 GiB each); then the ViT's 63 saved layer
                       # inputs (remat "full": 9217 x 1792 bf16 each, 1.94 GiB together).
                       grad_accum_steps=4)
