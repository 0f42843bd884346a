"""COCO Karpathy test captioning (also NoCaps / Flickr30K: set data.annotations / format).

    python eval.py --config configs/eval/coco_caption.py --config.checkpoint=PATH \
        --config.data.annotations=dataset_coco.json --config.data.image_root=coco/ --workdir OUT

Metrics: CIDEr(-D), BLEU-1..4, ROUGE-L (x100). CogVLM captions with the "base" template and
an empty query (the model continues after the image). For Karpathy files image_root is the
folder holding train2014/ and val2014/. Every field: configs/eval/_base.py.
"""

from configs.eval._base import get_config as base_config


def get_config():
  return base_config("caption")
