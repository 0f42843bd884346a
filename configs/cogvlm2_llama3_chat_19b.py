"""CogVLM2 chat (THUDM/cogvlm2-llama3-chat-19B): Llama-3-8B + EVA2-CLIP-E, 1344 px,
19.503B params."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogvlm2-llama3-chat-19b")
