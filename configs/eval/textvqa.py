"""TextVQA (TextVQA_0.5.1_val.json; images in train_images/), scored as MMF / EvalAI do."""

from configs.eval._base import get_config as base_config


def get_config():
  c = base_config("vqa")
  c.data.format = "textvqa"
  c.vqa_mode = "textvqa"  # MMF's EvalAIAnswerProcessor on both sides, no unanimity rule
  return c
