"""CogVLM-17B full fine-tune: every parameter (ViT included) at the same learning rate."""

from configs._recipes import instruction_data, recipe_config


def get_config():
  return recipe_config(preset_name="cogvlm-chat-17b", recipe="full", image_size=490,
                       mixture={"instructions": instruction_data()},
                       max_length=2048, lr=1e-5, batch_size=1024, steps=8000,
                       warmup_steps=200, grad_accum_steps=16)
