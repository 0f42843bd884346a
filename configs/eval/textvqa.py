"""TextVQA (TextVQA_0.5.1_val.json; images in train_images/) with the official VQA accuracy."""

from configs.eval._base import base_config


def get_config():
  return base_config("vqa", template="vqa", query_format="{question}", max_new_tokens=10,
                     questions="", format="textvqa", image_root="")
