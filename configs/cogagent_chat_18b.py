"""CogAgent chat (THUDM/cogagent-chat-hf): CogVLM v1 at 224 px + the 1120 px EVA2-CLIP-L cross
module, 18.29B params."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogagent-chat-18b")
