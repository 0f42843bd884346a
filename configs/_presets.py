"""Shared helper for the per-preset config files in this folder.

`preset_config(name)` is the config of one released (or tiny) checkpoint preset:

* ``model``: `cogvlm_jax.config.preset(name).to_dict()` — every `CogVLMConfig` field;
  `CogVLMConfig.from_dict(config.model)` gives the model config back (unknown keys fail).
* ``mesh``: the device mesh, sizes per axis (``data``, ``fsdp``, ``tensor``); -1 = all the
  remaining devices (see `cogvlm_jax.sharding.make_mesh`).
* ``seed``.

Full-size presets keep parameters and compute in bfloat16 (the released checkpoints are
bf16); the tiny ones use float32 so tests compare exactly.
"""

from __future__ import annotations

import ml_collections

from cogvlm_jax.config import preset


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`CogVLMConfig` of preset `name` (see `cogvlm_jax.config.PRESETS`) as a ConfigDict."""
  return preset(name, **overrides).to_dict()


def preset_config(name: str) -> ml_collections.ConfigDict:
  dtype = "float32" if name.startswith("tiny-") else "bfloat16"
  config = ml_collections.ConfigDict()
  config.model = model_config(name, dtype=dtype, param_dtype=dtype)
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.seed = 0
  return config
