"""CogVLM-17B LoRA supervised fine-tuning at 490 px, on one host.

Only LoRA adapters train (`train.lora`, cogvlm_jax/modeling/lora.py): rank 16, alpha 32,
dropout 0.05 on both experts' attention (fused QKV, dense) and MLPs of every decoder layer;
every base weight is frozen and held in bf16 (no gradients, no optimizer state), the adapters
in fp32 with their AdamW moments. Recipe "full" = one learning rate for all adapters. These
are our defaults (lr 2e-4, batch 64, 2000 steps), not the paper's. Afterwards:
`python -m cogvlm_jax.convert merge-lora` (a full checkpoint, then `to-hf`) or `to-peft` (a
PEFT adapter on the original Hugging Face model).

    python train.py --config configs/cogvlm_lora_sft.py --workdir runs/lora_sft \
        --config.train.init_from=/path/to/cogvlm-chat-hf \
        --config.data.mixture.instructions.json=/data/sft/instructions.json \
        --config.data.mixture.instructions.images=/data/sft/images
"""

from configs._recipes import instruction_data, recipe_config

DECODER_TARGETS = ["vision_expert_query_key_value", "language_expert_query_key_value",
                   "vision_expert_dense", "language_expert_dense", "vision_mlp", "language_mlp"]


def get_config():
  c = recipe_config(preset_name="cogvlm-chat-17b", recipe="full", image_size=490,
                    mixture={"instructions": instruction_data()},
                    max_length=2048, lr=2e-4, batch_size=64, steps=2000, warmup_steps=50,
                    grad_accum_steps=8)
  c.train.lora = dict(rank=16, alpha=32.0, dropout=0.05, targets=list(DECODER_TARGETS),
                      base_dtype="")  # QLoRA: "int8" base (modeling/quantize.py)
  c.optim.weight_decay = 0.0  # the usual LoRA setting: no decay pulling adapters to 0
  return c
