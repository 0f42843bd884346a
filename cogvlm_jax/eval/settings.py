"""The eval config: configs/eval/_base.py's defaults merged in, then every value checked once.

`resolve(config)` is the one place a config meets its defaults: a field the config lacks (a
plain dict from a test, an older config) takes the base default of its task; a field the base
does not know is refused as a typo. After it, code reads `config.field` directly.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import ml_collections


class EvalConfigError(ValueError):
  """A configuration / data problem the user must fix (eval.py prints it without a trace)."""


def _base():
  # The defaults live with the configs (configs/eval/_base.py), which the repository root
  # on sys.path provides to eval.py, train.py and the tests.
  from configs.eval import _base
  return _base


def _as_dict(config: Any) -> dict:
  """A ConfigDict (locked or not), FrozenConfigDict or plain mapping -> nested plain dicts."""
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _merge(defaults: dict, given: Mapping, prefix: str = "") -> dict:
  """`given` over `defaults`, recursively; a key the defaults lack is an EvalConfigError."""
  out = dict(defaults)
  for key, value in given.items():
    if key not in defaults:
      raise EvalConfigError(f"unknown eval setting config.{prefix}{key} "
                            "(every setting: configs/eval/_base.py)")
    if isinstance(defaults[key], dict) and isinstance(value, Mapping):
      out[key] = _merge(defaults[key], value, f"{prefix}{key}.")
    else:
      out[key] = value
  return out


def resolve(config: Any) -> ml_collections.ConfigDict:
  """The full, checked config of an evaluation (idempotent: a resolved config comes back equal).

  `config`: a ConfigDict or a plain dict with at least "task". Raises EvalConfigError naming
  the first bad field.
  """
  given = _as_dict(config)
  base = _base()
  task = given.get("task")
  if task not in base.TASK_DEFAULTS:
    raise EvalConfigError(f"unknown task {task!r}; known: {sorted(base.TASK_DEFAULTS)}")
  merged = _merge(base.get_config(task).to_dict(), given)
  merged["length_buckets"] = tuple(merged["length_buckets"] or ())
  merged["stop_tokens"] = tuple(merged["stop_tokens"] or ())
  validate(merged)
  return ml_collections.ConfigDict(merged)


_CHOICES = {
    "dtype": ("", "float32", "bfloat16", "float16"),
}
_DATA_FORMATS = {"caption": ("auto", "karpathy", "coco"), "vqa": ("vqav2", "textvqa")}


def _positive_int(c: Mapping, key: str, allow_zero: bool = False, prefix: str = "") -> None:
  v = c[key]
  low = 0 if allow_zero else 1
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    raise EvalConfigError(f"config.{prefix}{key} must be an integer >= {low}, got {v!r}")


def validate(c: Mapping) -> None:
  """Checks a merged config (plain dict); EvalConfigError naming the field on a bad value."""
  for key in ("batch_size", "max_new_tokens"):
    _positive_int(c, key)
  for key in ("report_samples", "max_samples"):
    _positive_int(c, key, allow_zero=True)
  buckets = c["length_buckets"]
  if any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in buckets):
    raise EvalConfigError(f"config.length_buckets must be positive integers, got {buckets!r}")
  modes = _base().VQA_MODES
  if c["vqa_mode"] not in modes:
    raise EvalConfigError(f"config.vqa_mode must be one of {modes}, got {c['vqa_mode']!r}")
  for key, choices in _CHOICES.items():
    if c[key] not in choices:
      raise EvalConfigError(f"config.{key} must be one of {choices}, got {c[key]!r}")
  if not isinstance(c["caption_meteor"], bool):  # 0 / 1 would pass an `in (True, False)`
    raise EvalConfigError(f"config.caption_meteor must be True or False, "
                          f"got {c['caption_meteor']!r}")
  _check_template(c)
  t = c["iou_threshold"]
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
    raise EvalConfigError(f"config.iou_threshold must be in (0, 1], got {t!r}")
  fmt = c["data"].get("format")
  if c["task"] in _DATA_FORMATS and fmt not in _DATA_FORMATS[c["task"]]:
    raise EvalConfigError(f"config.data.format must be one of {_DATA_FORMATS[c['task']]} for "
                          f"task {c['task']!r}, got {fmt!r}")
  if c["task"] == "demo":
    _positive_int(c["data"], "max_examples_per_task", allow_zero=True, prefix="data.")


def _check_template(c: Mapping) -> None:
  """A known conversation template (CogVLM's, or CogAgent's chat_old); "" only for the demo
  (each record names its own)."""
  from cogvlm_jax.tokenization import COGAGENT_TEMPLATES, TEMPLATES
  allowed = tuple(dict.fromkeys(TEMPLATES + COGAGENT_TEMPLATES)) + (
      ("",) if c["task"] == "demo" else ())
  if c["template"] not in allowed:
    raise EvalConfigError(f"config.template must be one of {allowed} for task {c['task']!r}, "
                          f"got {c['template']!r}")


def config_json(config: Any) -> dict:
  """The config as JSON-ready plain data (tuples become lists), for metrics.json."""
  return json.loads(json.dumps(_as_dict(config), default=str))
