"""CogVLM grounding (THUDM/cogvlm-grounding-*-hf): 490 px, template "base"."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogvlm-grounding")
