"""CogVLM2-19B (Llama-3-8B + EVA2-CLIP-E, 1344 px) LoRA supervised fine-tuning, on one host.

As configs/cogvlm_lora_sft.py: rank 16, alpha 32, dropout 0.05 adapters on both experts'
attention and MLPs of every decoder layer; base weights frozen in bf16, adapters and their
AdamW moments in fp32. Our defaults (lr 2e-4, batch 32, 2000 steps, seq 4096 = 2306
image-span tokens + text); the CogVLM2 release gives no training recipe.

    python train.py --config configs/cogvlm2_lora_sft.py --workdir runs/cogvlm2_lora \
        --config.train.init_from=/path/to/cogvlm2-llama3-chat-19B \
        --config.data.mixture.instructions.json=/data/sft/instructions.json \
        --config.data.mixture.instructions.images=/data/sft/images
"""

from configs._recipes import instruction_data, recipe_config
from configs.cogvlm_lora_sft import DECODER_TARGETS


def get_config():
  c = recipe_config(preset_name="cogvlm2-llama3-chat-19b", recipe="full", image_size=None,
                    mixture={"instructions": instruction_data()},
                    max_length=4096, lr=2e-4, batch_size=32, steps=2000, warmup_steps=50,
                    grad_accum_steps=4)
  c.train.lora = dict(rank=16, alpha=32.0, dropout=0.05, targets=list(DECODER_TARGETS),
                      base_dtype="")  # QLoRA: "int8" base (modeling/quantize.py)
  c.optim.weight_decay = 0.0
  return c
