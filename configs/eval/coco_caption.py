"""COCO Karpathy test captioning (also NoCaps / Flickr30K: set data.annotations / format).

    python eval.py --config configs/eval/coco_caption.py --config.checkpoint=PATH \
        --config.data.annotations=dataset_coco.json --config.data.image_root=coco/ --workdir OUT

Metrics: CIDEr(-D), BLEU-1..4, ROUGE-L (x100). CogVLM captions with the "base" template and
an empty query (the model continues after the image).
"""

from configs.eval._base import base_config


def get_config():
  # data.format: "auto" | "karpathy" (dataset_coco.json) | "coco" (captions_*.json, NoCaps).
  # For Karpathy files image_root is the folder holding train2014/ and val2014/.
  return base_config("caption", template="base", query_format="", max_new_tokens=40,
                     annotations="", format="auto", split="test", image_root="")
