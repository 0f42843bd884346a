"""Model configuration: typed configs, released presets, Hugging Face `config.json` both ways.

Users write `ml_collections.ConfigDict`s (``configs/*.py``); the model reads a frozen
`CogVLMConfig` built from one (`CogVLMConfig.from_dict`). Two variants exist:

* ``cogvlm``  — CogVLM (Vicuna-7B decoder, EVA2-CLIP-E, no GQA, RoPE base 10000);
* ``cogvlm2`` — CogVLM2 (Llama-3-8B decoder, grouped KV heads, bias on the vision-expert QKV,
  2x2 conv downsample of the vision tokens, RoPE base 500000);
* ``cogagent`` — CogAgent-18B: CogVLM v1 plus a learned position table before the GLU, a
  high-resolution EVA2-CLIP-L tower with 2D RoPE (`CrossVisionConfig`) and a cross-attention
  block in every decoder layer.

The RoPE base is hard-coded per variant in the original model code (``max_position_embeddings``
and any rope setting in ``config.json`` are ignored there), so it is derived from the variant
here rather than read from ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

VARIANTS = ("cogvlm", "cogvlm2", "cogagent")
ROPE_BASE = {"cogvlm": 10000.0, "cogvlm2": 500000.0, "cogagent": 10000.0}
# CogVLM2 overwrites the tokenizer's pad id with this Llama-3 reserved token and uses it as the
# image placeholder id; CogVLM uses the Vicuna pad id (0).
COGVLM2_PAD_TOKEN_ID = 128002
# "auto": splash on TPU, cuDNN on GPU, xla on CPU, by the platform of the mesh the model is
# sharded over (cogvlm_jax/modeling/attention.py).
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


def _check_positive(config, section: str) -> None:
  """ValueError naming the first int field below 1 (a size, count or id range), or a field
  of the wrong type; called first, so that later checks never divide by zero."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.type in ("int", int):
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{section}.{field.name} must be an integer, got {value!r}")
      if value < 1 and not field.name.endswith("_token_id"):
        raise ValueError(f"{section}.{field.name} must be >= 1, got {value}")
    elif field.type in ("float", float):
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{section}.{field.name} must be a number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """EVA2-CLIP vision tower (identical in both variants except for image size)."""

  hidden_size: int = 1792
  num_hidden_layers: int = 63
  num_heads: int = 16
  intermediate_size: int = 15360
  patch_size: int = 14
  image_size: int = 490
  in_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  dropout_prob: float = 0.0

  @property
  def grid_size(self) -> int:
    """Patches per image side, g = S / p."""
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    """Rows of the learned position table: g^2 patches + CLS."""
    return self.grid_size**2 + 1

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def validate(self) -> None:
    _check_positive(self, "model.vision")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"vision image_size {self.image_size} is not a multiple of patch_size "
          f"{self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclasses.dataclass(frozen=True)
class CrossVisionConfig:
  """CogAgent's high-resolution EVA2-CLIP-L tower and the cross-attention width.

  The field names are the original's (`cross_vision_config` keys, plus `image_size` =
  `cross_image_size` and `compute_hidden_size` = `cross_compute_hidden_size`); the defaults
  are the values the original hard-codes (released configs carry no `cross_vision_config`).
  """

  layers: int = 24  # stored blocks; the last one is stored but never run
  width: int = 1024  # Cx = cross_hidden_size
  head_width: int = 64  # dx
  mlp_ratio: float = 2.6667
  patch_size: int = 14
  pt_hw_seq_len: int = 16  # RoPE pretraining grid the positions are interpolated from
  image_size: int = 1120  # Sx = cross_image_size
  compute_hidden_size: int = 1024  # Cc = cross_compute_hidden_size (cross-attention width)
  layer_norm_eps: float = 1e-6
  head_size: int = 768  # out width of the stored, unused CLIP `head`

  @property
  def num_heads(self) -> int:
    return self.width // self.head_width

  @property
  def grid_size(self) -> int:
    """G = Sx / patch."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """N = G^2 cross features per image (CLS excluded)."""
    return self.grid_size**2

  @property
  def mlp_width(self) -> int:
    """Fx = int(Cx * mlp_ratio), truncated as in the original (1024 -> 2730)."""
    return int(self.width * self.mlp_ratio)

  @property
  def layers_run(self) -> int:
    """Only the first layers - 1 stored blocks run."""
    return self.layers - 1

  def validate(self, num_attention_heads: int) -> None:
    _check_positive(self, "model.cross_vision")
    if self.image_size % self.patch_size:
      raise ValueError(f"cross_vision image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.width % self.head_width:
      raise ValueError(f"cross_vision width {self.width} is not divisible by head_width "
                       f"{self.head_width}")
    if self.head_width % 4:
      raise ValueError(f"cross_vision head_width {self.head_width} must be a multiple of 4 "
                       f"(2D RoPE: half the dims per axis, rotated in pairs)")
    if self.layers < 2:
      raise ValueError(f"cross_vision layers must be >= 2 (the last stored block is not run), "
                       f"got {self.layers}")
    # The original reshapes the cross-attention output with cross_hidden_size: it only runs
    # when the two widths agree (spec trap 12), so other configs describe no real model.
    if self.compute_hidden_size != self.width:
      raise ValueError(f"cross_compute_hidden_size {self.compute_hidden_size} must equal "
                       f"cross_hidden_size (cross_vision width) {self.width}, as the original "
                       f"requires")
    if self.compute_hidden_size % num_attention_heads:
      raise ValueError(f"cross_compute_hidden_size {self.compute_hidden_size} is not divisible "
                       f"by num_attention_heads {num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CogVLMConfig:
  """Whole-model configuration: decoder, vision tower, and runtime (dtype/sharding) knobs."""

  variant: str = "cogvlm"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 2048
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int = 0
  template_version: str = "chat"
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  # CogAgent only (variant "cogagent"); None for CogVLM / CogVLM2.
  cross_vision: CrossVisionConfig | None = None
  # Runtime choices; they change how the model runs, never what it computes.
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls (bf16 on accelerators)
  attention_backend: str = "auto"
  remat_policy: str = "none"
  scan_layers: bool = True
  init_std: float = 0.02

  # ---- derived facts -------------------------------------------------------------------
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rope_base(self) -> float:
    return ROPE_BASE[self.variant]

  @property
  def vision_expert_qkv_bias(self) -> bool:
    return self.variant == "cogvlm2"

  @property
  def downsample(self) -> bool:
    """CogVLM2 merges 2x2 vision tokens with a stride-2 conv before the adapter."""
    return self.variant == "cogvlm2"

  @property
  def num_image_tokens(self) -> int:
    """Image feature tokens without boi/eoi: g^2 (v1) or (g/2)^2 (v2)."""
    g = self.vision.grid_size
    return (g // 2) ** 2 if self.downsample else g**2

  @property
  def image_span_length(self) -> int:
    """Vision-typed tokens per image in the sequence: boi + image tokens + eoi."""
    return self.num_image_tokens + 2

  @property
  def is_cogagent(self) -> bool:
    return self.variant == "cogagent"

  @property
  def cross_head_dim(self) -> int:
    """hc = Cc / H: the cross-attention uses the LM's head count with its own width."""
    return self.cross_vision.compute_hidden_size // self.num_attention_heads

  @property
  def image_placeholder_id(self) -> int:
    """Token id written at image positions before features overwrite them."""
    return COGVLM2_PAD_TOKEN_ID if self.variant == "cogvlm2" else self.pad_token_id

  def validate(self) -> "CogVLMConfig":
    """Raises ValueError naming the field when the config cannot describe a model."""
    _check_positive(self, "model")
    if self.variant not in VARIANTS:
      raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads "
                       f"{self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} not divisible by "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.variant != "cogvlm2" and self.num_key_value_heads != self.num_attention_heads:
      raise ValueError(f"{'CogAgent' if self.is_cogagent else 'CogVLM (v1)'} has no grouped KV "
                       "heads: num_key_value_heads must equal num_attention_heads")
    if self.is_cogagent != (self.cross_vision is not None):
      raise ValueError("cross_vision (the high-resolution tower) is set exactly for variant "
                       f"'cogagent'; got variant {self.variant!r} with cross_vision "
                       f"{'set' if self.cross_vision is not None else 'unset'}")
    if self.cross_vision is not None:
      self.cross_vision.validate(self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
    if self.attention_backend not in ATTENTION_BACKENDS:
      raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                       f"got {self.attention_backend!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    self.vision.validate()
    if self.downsample and self.vision.grid_size % 2:
      raise ValueError(f"CogVLM2's 2x2 downsample needs an even patch grid; image_size "
                       f"{self.vision.image_size} / patch {self.vision.patch_size} = "
                       f"{self.vision.grid_size}")
    if self.image_placeholder_id >= self.vocab_size:
      raise ValueError(f"image placeholder id {self.image_placeholder_id} is outside the "
                       f"vocabulary ({self.vocab_size})")
    return self

  # ---- ml_collections ------------------------------------------------------------------
  def to_dict(self) -> ml_collections.ConfigDict:
    d = dataclasses.asdict(self)
    if d["cross_vision"] is None:  # CogVLM / CogVLM2 dicts keep exactly their old keys
      del d["cross_vision"]
    return ml_collections.ConfigDict(d)

  @classmethod
  def from_dict(cls, d: Any) -> "CogVLMConfig":
    """Builds a config from a ConfigDict/dict; unknown keys are an error (typos)."""
    d = d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d)
    vision = d.pop("vision", {}) or {}
    if isinstance(vision, ml_collections.ConfigDict):
      vision = vision.to_dict()
    cross = d.pop("cross_vision", None)
    if isinstance(cross, ml_collections.ConfigDict):
      cross = cross.to_dict()
    _check_keys(cls, d, "model")
    _check_keys(VisionConfig, vision, "model.vision")
    if cross is not None:
      _check_keys(CrossVisionConfig, cross, "model.cross_vision")
      cross = CrossVisionConfig(**cross)
    return cls(vision=VisionConfig(**vision), cross_vision=cross, **d).validate()

  def replace(self, **kw) -> "CogVLMConfig":
    vision_kw = kw.pop("vision", None)
    vision = self.vision
    if isinstance(vision_kw, dict):
      vision = dataclasses.replace(vision, **vision_kw)
    elif vision_kw is not None:
      vision = vision_kw
    if isinstance(kw.get("cross_vision"), dict):
      kw["cross_vision"] = dataclasses.replace(self.cross_vision or CrossVisionConfig(),
                                               **kw["cross_vision"])
    return dataclasses.replace(self, vision=vision, **kw).validate()

  # ---- Hugging Face config.json --------------------------------------------------------
  def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict:
    """The fields of the original `config.json` (incl. auto_map and vision_config)."""
    v = self.vision
    hf = {
        "architectures": ["CogVLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_cogvlm.CogVLMConfig",
            "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
        },
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": self.hidden_size,
        "initializer_range": self.init_std,
        "intermediate_size": self.intermediate_size,
        "max_position_embeddings": self.max_position_embeddings,
        "num_attention_heads": self.num_attention_heads,
        "num_hidden_layers": self.num_hidden_layers,
        "pad_token_id": self.pad_token_id,
        "rms_norm_eps": self.rms_norm_eps,
        "template_version": self.template_version,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": self.vocab_size,
        "vision_config": {
            "dropout_prob": v.dropout_prob,
            "hidden_act": v.hidden_act,
            "in_channels": v.in_channels,
            "num_hidden_layers": v.num_hidden_layers,
            "hidden_size": v.hidden_size,
            "patch_size": v.patch_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "layer_norm_eps": v.layer_norm_eps,
            "num_positions": v.num_positions,
            "image_size": v.image_size,
        },
    }
    if self.variant == "cogvlm2":
      hf["num_multi_query_heads"] = self.num_key_value_heads
      hf["model_type"] = "cogvlm2"
    elif self.is_cogagent:
      hf.update(_cogagent_hf_fields(self.cross_vision))
    else:
      hf["model_type"] = "cogvlm"
    return hf

  @classmethod
  def from_hf_dict(cls, hf: dict, **runtime) -> "CogVLMConfig":
    """Reads an original `config.json` dict. `runtime` sets dtype/backend/remat fields."""
    if "vision_config" not in hf:
      raise ValueError("config.json has no 'vision_config'; is this a CogVLM checkpoint?")
    variant = _detect_variant(hf)
    vc = hf["vision_config"]
    vision = VisionConfig(
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_heads=vc["num_heads"],
        intermediate_size=vc["intermediate_size"],
        patch_size=vc["patch_size"],
        image_size=vc["image_size"],
        in_channels=vc.get("in_channels", 3),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        hidden_act=vc.get("hidden_act", "gelu"),
        dropout_prob=vc.get("dropout_prob", 0.0),
    )
    if "num_positions" in vc and vc["num_positions"] != vision.num_positions:
      raise ValueError(f"vision_config.num_positions {vc['num_positions']} does not match "
                       f"(image_size/patch_size)^2+1 = {vision.num_positions}")
    heads = hf["num_attention_heads"]
    cross = _cross_vision_from_hf(hf) if variant == "cogagent" else None
    if variant == "cogvlm2":
      defaults = dict(bos=128000, eos=128001, pad=COGVLM2_PAD_TOKEN_ID, eps=1e-5)
    else:
      defaults = dict(bos=1, eos=2, pad=0, eps=1e-6)
    eos = hf.get("eos_token_id", defaults["eos"])
    if isinstance(eos, list):
      eos = eos[0]
    pad = hf.get("pad_token_id")
    return cls(
        variant=variant,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_multi_query_heads", heads) if variant == "cogvlm2"
        else heads,
        rms_norm_eps=hf.get("rms_norm_eps", defaults["eps"]),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id", defaults["bos"]),
        eos_token_id=eos,
        pad_token_id=defaults["pad"] if pad is None else pad,
        template_version=hf.get("template_version", "chat"),
        init_std=hf.get("initializer_range", 0.02),
        vision=vision,
        cross_vision=cross,
        **runtime,
    ).validate()

  @classmethod
  def from_hf_json(cls, path: str, **runtime) -> "CogVLMConfig":
    """Reads `path` (a config.json or a folder holding one)."""
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no config.json at {path}")
    from cogvlm_jax.fileio import parse_json  # a broken file: ValueError naming it
    with open(path, "rb") as f:
      return cls.from_hf_dict(parse_json(path, f.read()), **runtime)


def _detect_variant(hf: dict) -> str:
  """CogVLM2 configs carry `num_multi_query_heads` (GQA); CogAgent ones the cross sizes."""
  if hf.get("model_type") in VARIANTS:
    return hf["model_type"]
  if "num_multi_query_heads" in hf:
    return "cogvlm2"
  if any(k in hf for k in _COGAGENT_KEYS) or any(
      "CogAgent" in a for a in hf.get("architectures") or ()):
    return "cogagent"
  return "cogvlm"


# CogAgent's config.json keys (CogAgentConfig) and its optional small-tower description.
_COGAGENT_KEYS = ("cross_hidden_size", "cross_compute_hidden_size", "cross_image_size")
_CROSS_VISION_KEYS = ("layers", "width", "head_width", "mlp_ratio", "patch_size",
                      "pt_hw_seq_len")


def _cross_vision_from_hf(hf: dict) -> CrossVisionConfig:
  """The tower from `cross_vision_config` (original key names), hard-coded values for the
  keys it lacks, and the image size / widths from CogAgentConfig's own keys."""
  default = CrossVisionConfig()
  given = hf.get("cross_vision_config") or {}
  unknown = sorted(set(given) - set(_CROSS_VISION_KEYS))
  if unknown:
    raise ValueError(f"config.json cross_vision_config has unknown keys {unknown}; known: "
                     f"{list(_CROSS_VISION_KEYS)}")
  fields = {k: given.get(k, getattr(default, k)) for k in _CROSS_VISION_KEYS}
  cross = CrossVisionConfig(
      **fields, image_size=hf.get("cross_image_size", default.image_size),
      compute_hidden_size=hf.get("cross_compute_hidden_size", default.compute_hidden_size))
  hidden = hf.get("cross_hidden_size", default.width)
  if hidden != cross.width:
    raise ValueError(f"config.json cross_hidden_size {hidden} must equal the cross tower's "
                     f"width {cross.width} (the in-width of the cross-attention key_value)")
  return cross


def _cogagent_hf_fields(cross: CrossVisionConfig) -> dict:
  """CogAgentConfig's keys; `cross_vision_config` only where the tower is not the released one
  (released configs carry no such key)."""
  hf = {
      "architectures": ["CogAgentForCausalLM"],
      "auto_map": {
          "AutoConfig": "configuration_cogagent.CogAgentConfig",
          "AutoModelForCausalLM": "modeling_cogagent.CogAgentForCausalLM",
      },
      "model_type": "cogagent",
      "cross_hidden_size": cross.width,
      "cross_compute_hidden_size": cross.compute_hidden_size,
      "cross_image_size": cross.image_size,
  }
  default = CrossVisionConfig()
  if any(getattr(cross, k) != getattr(default, k) for k in _CROSS_VISION_KEYS):
    hf["cross_vision_config"] = {k: getattr(cross, k) for k in _CROSS_VISION_KEYS}
  return hf


def _check_keys(cls, d: dict, where: str) -> None:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown {where} config keys {unknown}; known: {sorted(known)}")


# ---- presets ---------------------------------------------------------------------------

_V1 = dict(variant="cogvlm", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
           rms_norm_eps=1e-5, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
           pad_token_id=0)
_V2 = dict(variant="cogvlm2", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
           rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=128000,
           eos_token_id=128001, pad_token_id=COGVLM2_PAD_TOKEN_ID)
_EVA2_CLIP_E = dict(hidden_size=1792, num_hidden_layers=63, num_heads=16,
                    intermediate_size=15360, patch_size=14)
# CogAgent-18B = CogVLM v1 at 224 px + the 1120 px EVA2-CLIP-L (CrossVisionConfig's defaults).
_COGAGENT = dict(_V1, variant="cogagent", vision=dict(_EVA2_CLIP_E, image_size=224),
                 cross_vision={})

PRESETS: dict[str, dict] = {
    "cogvlm-chat-17b": dict(_V1, template_version="chat", vision=dict(_EVA2_CLIP_E, image_size=490)),
    "cogvlm-base-224": dict(_V1, template_version="base", vision=dict(_EVA2_CLIP_E, image_size=224)),
    "cogvlm-base-490": dict(_V1, template_version="base", vision=dict(_EVA2_CLIP_E, image_size=490)),
    "cogvlm-grounding": dict(_V1, template_version="base", vision=dict(_EVA2_CLIP_E, image_size=490)),
    "cogvlm2-llama3-chat-19b": dict(_V2, template_version="chat",
                                    vision=dict(_EVA2_CLIP_E, image_size=1344)),
    "cogvlm2-llama3-chinese-chat-19b": dict(_V2, template_version="chat",
                                            vision=dict(_EVA2_CLIP_E, image_size=1344)),
    "cogagent-chat-18b": dict(_COGAGENT, template_version="chat"),
    # THUDM's README maps the VQA model to the chat_old prompt format (unverified: the config
    # file was not reachable; from_hf_json reads the real one's template_version).
    "cogagent-vqa-18b": dict(_COGAGENT, template_version="chat_old"),
    # Tiny configs for tests and the demo: same structure, toy sizes.
    "tiny-cogvlm": dict(variant="cogvlm", vocab_size=128, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, template_version="chat",
                        vision=dict(hidden_size=32, num_hidden_layers=2, num_heads=4,
                                    intermediate_size=64, patch_size=4, image_size=16)),
    "tiny-cogvlm2": dict(variant="cogvlm2", vocab_size=128300, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                         bos_token_id=128000, eos_token_id=128001,
                         pad_token_id=COGVLM2_PAD_TOKEN_ID, template_version="chat",
                         vision=dict(hidden_size=32, num_hidden_layers=2, num_heads=4,
                                     intermediate_size=64, patch_size=4, image_size=16)),
    # 3 stored cross blocks (2 run), Fx = int(32 * 2.6667) = 85, G = 6: N = 36 cross tokens.
    "tiny-cogagent": dict(variant="cogagent", vocab_size=256, hidden_size=64,
                          intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          template_version="chat",
                          vision=dict(hidden_size=32, num_hidden_layers=2, num_heads=4,
                                      intermediate_size=64, patch_size=4, image_size=16),
                          cross_vision=dict(layers=3, width=32, head_width=8, patch_size=4,
                                            pt_hw_seq_len=16, image_size=24,
                                            compute_hidden_size=32)),
}


def preset(name: str, **overrides) -> CogVLMConfig:
  """A released (or tiny) configuration by name; `overrides` replace fields."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  d = dict(PRESETS[name])
  vision = dict(d.pop("vision"))
  vision.update(overrides.pop("vision", {}) or {})
  cross = d.pop("cross_vision", None)
  if cross is not None or overrides.get("cross_vision"):
    cross = dict(cross or {}, **(overrides.pop("cross_vision", None) or {}))
    cross = CrossVisionConfig(**cross)
  d.update(overrides)
  return CogVLMConfig(vision=VisionConfig(**vision), cross_vision=cross, **d).validate()
