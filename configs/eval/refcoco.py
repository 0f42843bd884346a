"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding: accuracy at IoU >= 0.5.

data.annotations is the JSON form described in `cogvlm_jax.eval.grounding.load_refcoco_json`
(the official .p pickles are never read); data.split: val / testA / testB / test / all.
Answers are parsed as CogVLM boxes [[x0,y0,x1,y1]] (000..999); unparseable ones count wrong.
"""

from configs.eval._base import base_config


def get_config():
  c = base_config("refcoco", template="base",
                  query_format="Where is {sentence}? Answer in [[x0,y0,x1,y1]] format.",
                  max_new_tokens=24, annotations="", split="val", image_root="")
  c.iou_threshold = 0.5
  return c
