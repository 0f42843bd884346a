"""Evaluation metrics and reports for CogVLM: VQA accuracy, caption metrics, grounding, POPE.

All scores are percentages (x100), as papers report them; counts are plain integers.

    from cogvlm_jax.eval import vqa_score, caption_scores, rec_accuracy, pope_scores
    from cogvlm_jax.eval import write_report

* `vqa.py`: official VQA answer normalisation and accuracy (VQAv2, OK-VQA, TextVQA), loaders.
* `caption.py`: BLEU-4, CIDEr-D, ROUGE-L via pycocoevalcap (PTB tokenizer needs Java; a
  flagged Python fallback otherwise), Karpathy-split and COCO-format loaders.
* `grounding.py`: CogVLM's `[[x0,y0,x1,y1]]` box format, IoU, REC accuracy, RefCOCO JSON.
* `pope.py`: POPE yes/no parsing (the official rule) and accuracy / precision / recall / F1.
* `report.py`: one self-contained HTML file with the metrics and sample cards.
"""

from cogvlm_jax.eval.caption import (caption_scores, load_coco_captions, load_karpathy,
                                     python_tokenize, ptb_tokenize)
from cogvlm_jax.eval.grounding import (box_iou, format_box, load_refcoco_json, parse_boxes,
                                       rec_accuracy)
from cogvlm_jax.eval.pope import load_pope, parse_pope_answer, pope_scores
from cogvlm_jax.eval.report import render_report, thumbnail_data_uri, write_report
from cogvlm_jax.eval.vqa import (annotations_from_records, load_textvqa, load_vqav2,
                                 normalize_answer, vqa_accuracy, vqa_score)

__all__ = [
    "caption_scores", "load_coco_captions", "load_karpathy", "python_tokenize", "ptb_tokenize",
    "box_iou", "format_box", "load_refcoco_json", "parse_boxes", "rec_accuracy",
    "load_pope", "parse_pope_answer", "pope_scores",
    "render_report", "thumbnail_data_uri", "write_report",
    "annotations_from_records", "load_textvqa", "load_vqav2", "normalize_answer",
    "vqa_accuracy", "vqa_score",
]
