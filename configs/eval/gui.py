"""GUI grounding on screenshots (CogAgent): "Where is "<element text>"?", accuracy at IoU >= 0.5.

data.annotations is the screenshot JSON of `cogvlm_jax.data.sources.gui` (elements with pixel
[x0, y0, x1, y1] boxes), data.image_root the folder of its screenshots. The question and the
chat template are those the "gui" training source (configs/cogagent_gui_sft.py) trains on.
"""

from configs.eval._base import get_config as base_config


def get_config():
  return base_config("gui")
