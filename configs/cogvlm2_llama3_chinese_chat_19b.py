"""CogVLM2 Chinese chat (THUDM/cogvlm2-llama3-chinese-chat-19B): same shapes as the English one."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogvlm2-llama3-chinese-chat-19b")
