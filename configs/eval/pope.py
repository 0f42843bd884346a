"""POPE object hallucination (coco_pope_{random,popular,adversarial}.json, JSON lines).

Metrics: accuracy, precision, recall, F1, yes-ratio (official answer parsing).
"""

from configs.eval._base import get_config as base_config


def get_config():
  return base_config("pope")
