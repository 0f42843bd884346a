"""Fields shared by every evaluation config (see `cogvlm_jax.eval.runner`).

* ``checkpoint``: a Hugging Face CogVLM folder, a converted checkpoint or a training workdir.
* ``tokenizer``: folder/file of the tokenizer; "" = the checkpoint folder (then, for the demo,
  the data folder).
* ``batch_size``: must be divisible by the mesh's data x fsdp size.
* ``length_buckets``: prompts are left-padded to the smallest bucket that fits, so generation
  compiles once per bucket; a prompt longer than all of them is an error. Empty = BOS + the
  model's image span + 16 / 32 / 64 / 128 / 256 text tokens.
* ``max_new_tokens``, ``dtype`` ("" = float32; "bfloat16" for the released checkpoints),
  ``mesh`` (sizes per axis, -1 = the remaining devices), ``report_samples`` (cards in
  report.html; 0 = no report), ``max_samples`` (0 = all), ``template`` ("" = the task's),
  ``query_format`` (the task's default when ""), ``stop_tokens`` (token strings that also end
  an answer, besides eos; skipped when not in the vocabulary).
"""

from __future__ import annotations

import ml_collections


def base_config(task: str, *, template: str = "", query_format: str = "",
                length_buckets=(), max_new_tokens: int = 10,
                batch_size: int = 8, **data) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.checkpoint = ""
  c.tokenizer = ""
  c.dtype = "bfloat16"
  c.batch_size = batch_size
  c.max_new_tokens = max_new_tokens
  c.length_buckets = tuple(length_buckets)
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.report_samples = 24
  c.max_samples = 0
  c.template = template
  c.query_format = query_format
  c.stop_tokens = ("<|eot_id|>",)  # extra stop tokens, used when in the vocabulary
  c.caption_tokenizer = "auto"  # PTB via Java when available (published numbers), else Python
  c.data = ml_collections.ConfigDict(data)
  return c
