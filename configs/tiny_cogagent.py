"""Tiny CogAgent (CogAgent structure: cross tower with 3 stored blocks, toy sizes, float32)."""

from configs._presets import preset_config


def get_config():
  return preset_config("tiny-cogagent")
