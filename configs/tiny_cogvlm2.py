"""Tiny CogVLM2 (v2 structure, toy sizes, float32): tests and the demo."""

from configs._presets import preset_config


def get_config():
  return preset_config("tiny-cogvlm2")
