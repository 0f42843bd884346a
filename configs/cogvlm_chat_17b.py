"""CogVLM chat (THUDM/cogvlm-chat-hf): Vicuna-7B + EVA2-CLIP-E, 490 px, ~17.64B params."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogvlm-chat-17b")
