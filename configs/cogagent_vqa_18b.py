"""CogAgent VQA (THUDM/cogagent-vqa-hf): the sizes of cogagent-chat-18b, chat_old prompts."""

from configs._presets import preset_config


def get_config():
  return preset_config("cogagent-vqa-18b")
