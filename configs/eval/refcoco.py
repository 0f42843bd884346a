"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding: accuracy at IoU >= 0.5.

data.annotations is the JSON form described in `cogvlm_jax.eval.refcoco.load_refcoco_json`
(the official .p pickles are never read); data.split: val / testA / testB / test / all.
Answers are parsed as CogVLM boxes [[x0,y0,x1,y1]] (000..999); unparseable ones count wrong.
"""

from configs.eval._base import get_config as base_config


def get_config():
  return base_config("refcoco")
