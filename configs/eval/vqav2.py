"""VQAv2 (and OK-VQA, same file format) with the official VQA accuracy.

    python eval.py --config configs/eval/vqav2.py --config.checkpoint=PATH \
        --config.data.questions=v2_OpenEnded_mscoco_val2014_questions.json \
        --config.data.annotations=v2_mscoco_val2014_annotations.json \
        --config.data.image_root=coco/val2014 --workdir OUT

Without annotations (test-dev) predictions are written and no accuracy is computed.
"""

from configs.eval._base import base_config


def get_config():
  return base_config("vqa", template="vqa", query_format="{question}", max_new_tokens=10,
                     questions="", annotations="", format="vqav2", image_root="")
