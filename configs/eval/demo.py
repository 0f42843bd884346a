"""The demo data's held-out split (caption, VQA, grounding) for a `configs/demo.py` run.

    python eval.py --config configs/eval/demo.py --config.checkpoint=runs/demo --workdir OUT

Prompts use each record's template, exactly as training built them. The tokenizer is the data
folder's (a training workdir holds none). Each task is also scored for its majority /
constant baseline (the train split). train.py runs this same task at the end of training.
"""

from configs.eval._base import get_config as base_config


def get_config():
  c = base_config("demo")
  c.length_buckets = (40, 56)  # BOS + 38 image-span tokens + prompt: captions 39, others <= 51
  c.batch_size = 40
  c.dtype = "float32"  # the demo model trains in float32
  c.report_samples = 30
  # train.py runs this at the end of every demo run: METEOR's JVM start (paraphrase tables,
  # 10-25 s on 2 cores) would be a tenth of the main job; CIDEr and exact match say enough.
  c.caption_meteor = False
  return c
