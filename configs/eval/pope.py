"""POPE object hallucination (coco_pope_{random,popular,adversarial}.json, JSON lines).

Metrics: accuracy, precision, recall, F1, yes-ratio (official answer parsing).
"""

from configs.eval._base import base_config


def get_config():
  return base_config("pope", template="chat", query_format="{question}", max_new_tokens=8,
                     questions="", image_root="")
