"""The demo data's held-out split (caption, VQA, grounding) for a `configs/demo.py` run.

    python eval.py --config configs/eval/demo.py --config.checkpoint=runs/demo --workdir OUT

Prompts use each record's template, exactly as training built them. The tokenizer is the data
folder's (a training workdir holds none).
"""

from configs.eval._base import base_config


def get_config():
  c = base_config("demo", length_buckets=(32, 48), max_new_tokens=20, batch_size=40,
                  dir="data/demo", split="eval", max_examples_per_task=0)
  c.dtype = "float32"
  c.report_samples = 30
  return c
