"""VQAv2 (and OK-VQA, same file format) with the official VQA accuracy.

    python eval.py --config configs/eval/vqav2.py --config.checkpoint=PATH \
        --config.data.questions=v2_OpenEnded_mscoco_val2014_questions.json \
        --config.data.annotations=v2_mscoco_val2014_annotations.json \
        --config.data.image_root=coco/val2014 --workdir OUT

Without annotations (test-dev) predictions are written and no accuracy is computed.
`--config.vqa_mode=legacy_2016` reproduces the 2016-2021 evaluator (cogvlm_jax/eval/vqa.py).
"""

from configs.eval._base import get_config as base_config


def get_config():
  return base_config("vqa")
