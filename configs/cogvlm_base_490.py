"""CogVLM base (THUDM/cogvlm-base-490-hf): 490 px, template "base"."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogvlm-base-490")
