"""PyTorch reference of CogVLM (v1) and CogVLM2 (v2): the test oracle for the JAX port.

Written from /work/shared/cogvlm_spec.md (the facts about the original Hugging Face
``modeling_cogvlm.py`` of ``THUDM/cogvlm-chat-hf`` and ``THUDM/cogvlm2-llama3-chat-19B``),
NOT copied from the original code. Module and parameter names follow the original so that
``state_dict()`` has exactly the released checkpoint's keys and shapes (spec section 6) and a
released checkpoint can be loaded with ``load_state_dict``.

Deliberate differences from the original, none of which changes the math:

* Attention always uses the explicit path (q / sqrt(hd) @ k^T + additive mask, softmax in
  float32); the original switches to SDPA when the mask is purely causal or empty.
* Everything is out of place (expert routing writes with ``index_put`` into a fresh tensor, RoPE
  builds new tensors), so both variants support backprop (the original v2 applies RoPE in place
  on views of the fused QKV through a Triton kernel and cannot).
* ``images`` is a tensor [B_img, 3, S, S] (one image per sample that has a vision span, in batch
  order); the original's list-of-lists form is accepted too.
* ``generate_greedy`` is a small stand-alone greedy loop with a legacy tuple KV cache (spec
  section 9) instead of ``transformers.GenerationMixin``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
ROPE_BASE = {"cogvlm": 10000.0, "cogvlm2": 500000.0}


def detect_variant(hf_config: dict) -> str:
  """'cogvlm2' iff model_type says so or the config has GQA (`num_multi_query_heads`)."""
  if hf_config.get("model_type") == "cogvlm2" or "num_multi_query_heads" in hf_config:
    return "cogvlm2"
  return "cogvlm"


class ModelOutput(dict):
  """A dict whose keys are also attributes (``out.logits`` and ``out['logits']``)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


# ============================================================================================
# Vision tower: EVA2-CLIP (spec section 1)
# ============================================================================================

def _vision_act(name: str):
  if name == "gelu":
    return lambda x: F.gelu(x)  # exact erf form (HF ACT2FN["gelu"])
  raise ValueError(f"unsupported vision hidden_act {name!r} (released configs use 'gelu')")


class PatchEmbedding(nn.Module):
  """Conv patchify (with bias) -> row-major tokens, prepend CLS, add the full position table."""

  def __init__(self, vc: dict):
    super().__init__()
    cv, p = vc["hidden_size"], vc["patch_size"]
    self.proj = nn.Conv2d(vc.get("in_channels", 3), cv, kernel_size=p, stride=p)
    self.cls_embedding = nn.Parameter(torch.zeros(1, cv))
    self.position_embedding = nn.Embedding(vc["num_positions"], cv)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.proj(images)  # [B, Cv, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, Cv], index = row*g + col
    cls = self.cls_embedding.unsqueeze(0).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    if x.shape[1] != self.position_embedding.num_embeddings:
      raise ValueError(f"image gives {x.shape[1]} tokens (CLS incl.) but the position table has "
                       f"{self.position_embedding.num_embeddings} rows; wrong image size?")
    return x + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
  """Bidirectional MHA with fused, biased qkv laid out [q | k | v], each head-major."""

  def __init__(self, vc: dict):
    super().__init__()
    cv = vc["hidden_size"]
    self.num_heads = vc["num_heads"]
    self.head_dim = cv // self.num_heads
    self.scale = self.head_dim**-0.5
    self.query_key_value = nn.Linear(cv, 3 * cv)
    self.dense = nn.Linear(cv, cv)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, l, _ = x.shape
    qkv = self.query_key_value(x).reshape(b, l, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, L, d]
    scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, l, -1)
    return self.dense(out)


class MLP(nn.Module):
  """fc1 (bias) -> GELU(erf) -> fc2 (bias)."""

  def __init__(self, vc: dict):
    super().__init__()
    self.activation_fn = _vision_act(vc.get("hidden_act", "gelu"))
    self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
    self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.activation_fn(self.fc1(x)))


class TransformerLayer(nn.Module):
  """Post-norm sublayers: h <- h + LN(Attn(h)); h <- h + LN(MLP(h))."""

  def __init__(self, vc: dict):
    super().__init__()
    eps = vc.get("layer_norm_eps", 1e-6)
    self.input_layernorm = nn.LayerNorm(vc["hidden_size"], eps=eps)
    self.attention = Attention(vc)
    self.mlp = MLP(vc)
    self.post_attention_layernorm = nn.LayerNorm(vc["hidden_size"], eps=eps)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    h = h + self.input_layernorm(self.attention(h))
    h = h + self.post_attention_layernorm(self.mlp(h))
    return h


class Transformer(nn.Module):

  def __init__(self, vc: dict):
    super().__init__()
    self.layers = nn.ModuleList([TransformerLayer(vc) for _ in range(vc["num_hidden_layers"])])

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    for layer in self.layers:
      h = layer(h)
    return h


class GLU(nn.Module):
  """Adapter: linear_proj -> GELU(LayerNorm eps 1e-5) -> dense_4h_to_h(SiLU(gate) * h_to_4h)."""

  def __init__(self, hidden_size: int, intermediate_size: int, in_features: int):
    super().__init__()
    self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
    self.norm1 = nn.LayerNorm(hidden_size)  # torch default eps 1e-5, NOT the vision eps
    self.dense_h_to_4h = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.dense_4h_to_h = nn.Linear(intermediate_size, hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.linear_proj(x)
    x = F.gelu(self.norm1(x))
    x = F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x)
    return self.dense_4h_to_h(x)


class EVA2CLIPModel(nn.Module):
  """Vision tower + (v2: 2x2 conv downsample) + GLU adapter + boi/eoi."""

  def __init__(self, hf_config: dict):
    super().__init__()
    vc = hf_config["vision_config"]
    self.variant = detect_variant(hf_config)
    d = hf_config["hidden_size"]
    self.patch_embedding = PatchEmbedding(vc)
    self.transformer = Transformer(vc)
    self.linear_proj = GLU(d, hf_config["intermediate_size"], in_features=vc["hidden_size"])
    if self.variant == "cogvlm2":
      cv = vc["hidden_size"]
      self.conv = nn.Conv2d(cv, cv, kernel_size=2, stride=2)
    self.boi = nn.Parameter(torch.zeros(1, 1, d))
    self.eoi = nn.Parameter(torch.zeros(1, 1, d))

  def encode_vision_tower(self, images: torch.Tensor) -> torch.Tensor:
    """EVA2-CLIP output with CLS dropped: [B, g^2, Cv] (no final norm)."""
    images = images.to(self.patch_embedding.proj.weight.dtype)
    x = self.transformer(self.patch_embedding(images))
    return x[:, 1:]

  def downsample(self, x: torch.Tensor) -> torch.Tensor:
    """CogVLM2 only: [B, g^2, Cv] -> [B, g, g, Cv] -> NCHW -> conv 2x2/2 -> [B, (g/2)^2, Cv]."""
    b, s, c = x.shape
    g = math.isqrt(s)
    assert g * g == s, s
    x = x.reshape(b, g, g, c).permute(0, 3, 1, 2)
    x = self.conv(x)
    return x.flatten(2).transpose(1, 2)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """Final image features [B, n_img + 2, D] (boi, image tokens, eoi)."""
    x = self.encode_vision_tower(images)
    if self.variant == "cogvlm2":
      x = self.downsample(x)
    x = self.linear_proj(x)
    boi = self.boi.expand(x.shape[0], -1, -1)
    eoi = self.eoi.expand(x.shape[0], -1, -1)
    return torch.cat([boi, x, eoi], dim=1)


# ============================================================================================
# Position ids and expert routing (spec sections 4 and 5)
# ============================================================================================

def build_position_ids(token_type_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.LongTensor:
  """RoPE positions: BOS 0, boi 1, all inner image tokens 2, eoi 3, text 4, 5, ...

  Pads (mask 0) are "neither type" (-1) and add nothing; index 0 is always 0.
  """
  tmp = token_type_ids.clone().long()
  if attention_mask is not None:
    tmp[~attention_mask.bool()] = -1
  lang, vis = LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
  # First and last token of every image span count as language (computed before relabelling).
  is_boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
  is_boi_eoi[:, 1:] |= (tmp[:, 1:] == vis) & (tmp[:, :-1] == lang)
  is_boi_eoi[:, 0] |= tmp[:, 0] == vis
  is_boi_eoi[:, :-1] |= (tmp[:, :-1] == vis) & (tmp[:, 1:] == lang)
  is_boi_eoi[:, -1] |= tmp[:, -1] == vis
  tmp[is_boi_eoi] = lang
  y = torch.zeros_like(tmp)
  y[:, 1:] = ((tmp[:, 1:] == lang) | ((tmp[:, 1:] == vis) & (tmp[:, :-1] == lang))).long()
  return y.cumsum(dim=-1)


def get_expert_mask(token_type_ids: torch.Tensor):
  """(vision_mask, language_mask): vision iff this AND the next token are vision-typed."""
  vision = torch.zeros_like(token_type_ids, dtype=torch.bool)
  vision[:, :-1] = ((token_type_ids[:, :-1] == VISION_TOKEN_TYPE)
                    & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE))
  return vision, ~vision


def _route(x: torch.Tensor, vision_mask: torch.Tensor, language_mask: torch.Tensor,
           vision_fn: nn.Module, language_fn: nn.Module, out_features: int) -> torch.Tensor:
  """output[vision_mask] = vision_fn(x[vision_mask]); same for language (out of place)."""
  out = x.new_zeros(*x.shape[:-1], out_features)
  out = out.index_put((vision_mask,), vision_fn(x[vision_mask]))
  out = out.index_put((language_mask,), language_fn(x[language_mask]))
  return out


# ============================================================================================
# Decoder (spec section 5)
# ============================================================================================

class RMSNorm(nn.Module):

  def __init__(self, hidden_size: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(hidden_size))
    self.variance_epsilon = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight * h).to(dtype)


class RotaryEmbedding(nn.Module):
  """GPT-NeoX rotate-half RoPE over the full head dim; uses the stored ``inv_freq`` buffer."""

  def __init__(self, dim: int, base: float):
    super().__init__()
    self.dim, self.base = dim, base
    self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

  def compute_inv_freq(self) -> torch.Tensor:
    return 1.0 / (self.base**(torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

  def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, 1, L, hd] for positions [B, L]. Angles are positions x inv_freq, both in
    inv_freq's dtype (float32 normally; the original does the same in bf16, spec 10.12)."""
    inv_freq = self.inv_freq
    freqs = position_ids.to(inv_freq.dtype)[..., None] * inv_freq  # [B, L, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([-x2, x1], dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  return x * cos + rotate_half(x) * sin


class VisionExpertAttention(nn.Module):
  """Expert-routed fused QKV and output projection; RoPE; GQA (v2); explicit-matmul attention."""

  def __init__(self, hf_config: dict):
    super().__init__()
    variant = detect_variant(hf_config)
    self.hidden_size = d = hf_config["hidden_size"]
    self.num_heads = hf_config["num_attention_heads"]
    self.num_kv_heads = (hf_config["num_multi_query_heads"] if variant == "cogvlm2"
                         else self.num_heads)
    self.head_dim = d // self.num_heads
    self.qkv_size = d + 2 * self.num_kv_heads * self.head_dim
    self.rotary_emb = RotaryEmbedding(self.head_dim, base=ROPE_BASE[variant])
    self.vision_expert_query_key_value = nn.Linear(d, self.qkv_size, bias=variant == "cogvlm2")
    self.vision_expert_dense = nn.Linear(d, d, bias=False)
    self.language_expert_query_key_value = nn.Linear(d, self.qkv_size, bias=False)
    self.language_expert_dense = nn.Linear(d, d, bias=False)

  def forward(self, hidden_states, token_type_ids, position_ids, attention_mask,
              past_key_value=None, use_cache=False):
    b, l, _ = hidden_states.shape
    vision_mask, language_mask = get_expert_mask(token_type_ids)
    mixed = _route(hidden_states, vision_mask, language_mask,
                   self.vision_expert_query_key_value, self.language_expert_query_key_value,
                   self.qkv_size)
    kv_dim = self.num_kv_heads * self.head_dim
    q, k, v = torch.split(mixed, [self.hidden_size, kv_dim, kv_dim], dim=-1)
    q = q.reshape(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
    k = k.reshape(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, L, hd]
    v = v.reshape(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)

    cos, sin = self.rotary_emb.cos_sin(position_ids, q.dtype)
    q = apply_rotary_pos_emb(q, cos, sin)
    k = apply_rotary_pos_emb(k, cos, sin)
    if past_key_value is not None:
      k = torch.cat([past_key_value[0], k], dim=2)
      v = torch.cat([past_key_value[1], v], dim=2)
    present = (k, v) if use_cache else None

    rep = self.num_heads // self.num_kv_heads  # query head i uses kv head i // rep
    k_full = k.repeat_interleave(rep, dim=1)
    v_full = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q / math.sqrt(self.head_dim), k_full.transpose(-1, -2))
    scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    ctx = torch.matmul(probs, v_full).transpose(1, 2).reshape(b, l, self.hidden_size)

    out = _route(ctx, vision_mask, language_mask, self.vision_expert_dense,
                 self.language_expert_dense, self.hidden_size)
    return out, present


class MLPExpert(nn.Module):
  """LLaMA MLP: down(SiLU(gate(x)) * up(x)), no biases. (Named `MLP` in the original decoder;
  renamed here because the vision tower's `MLP` lives in the same file.)"""

  def __init__(self, hidden_size: int, intermediate_size: int):
    super().__init__()
    self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):

  def __init__(self, hf_config: dict):
    super().__init__()
    d, f = hf_config["hidden_size"], hf_config["intermediate_size"]
    self.hidden_size = d
    self.language_mlp = MLPExpert(d, f)
    self.vision_mlp = MLPExpert(d, f)

  def forward(self, hidden_states, token_type_ids):
    vision_mask, language_mask = get_expert_mask(token_type_ids)
    return _route(hidden_states, vision_mask, language_mask, self.vision_mlp,
                  self.language_mlp, self.hidden_size)


class CogVLMDecoderLayer(nn.Module):

  def __init__(self, hf_config: dict):
    super().__init__()
    d, eps = hf_config["hidden_size"], hf_config.get("rms_norm_eps", 1e-5)
    self.self_attn = VisionExpertAttention(hf_config)
    self.mlp = VisionExpertMLP(hf_config)
    self.input_layernorm = RMSNorm(d, eps)
    self.post_attention_layernorm = RMSNorm(d, eps)

  def forward(self, h, token_type_ids, position_ids, attention_mask, past_key_value=None,
              use_cache=False):
    attn, present = self.self_attn(self.input_layernorm(h), token_type_ids, position_ids,
                                   attention_mask, past_key_value, use_cache)
    h = h + attn
    h = h + self.mlp(self.post_attention_layernorm(h), token_type_ids)
    return h, present


def make_attention_mask(attention_mask: torch.Tensor, q_len: int, past_len: int,
                        dtype: torch.dtype) -> torch.Tensor:
  """Additive [B, 1, q, past+q] mask: causal (future keys finfo.min, only when q > 1) plus
  padding (masked keys finfo.min); the two add (may reach -inf), like the original."""
  b, t = attention_mask.shape
  assert t == past_len + q_len, (t, past_len, q_len)
  neg = torch.finfo(dtype).min
  pad = torch.zeros(b, 1, q_len, t, dtype=dtype, device=attention_mask.device)
  pad = pad.masked_fill(~attention_mask.bool()[:, None, None, :], neg)
  if q_len == 1:
    return pad
  causal = torch.full((q_len, q_len), neg, dtype=dtype, device=attention_mask.device).triu(1)
  causal = torch.cat([torch.zeros(q_len, past_len, dtype=dtype, device=causal.device), causal],
                     dim=-1)
  return pad + causal[None, None]


class CogVLMModel(nn.Module):

  def __init__(self, hf_config: dict):
    super().__init__()
    d = hf_config["hidden_size"]
    self.variant = detect_variant(hf_config)
    self.embed_tokens = nn.Embedding(hf_config["vocab_size"], d)
    self.layers = nn.ModuleList(
        [CogVLMDecoderLayer(hf_config) for _ in range(hf_config["num_hidden_layers"])])
    self.norm = RMSNorm(d, hf_config.get("rms_norm_eps", 1e-5))
    self.vision = EVA2CLIPModel(hf_config)

  def encode_images(self, images) -> torch.Tensor:
    """images: tensor [B_img, 3, S, S] or the original list (per sample) of lists of [3,S,S]."""
    if isinstance(images, (list, tuple)):
      images = torch.stack([im for sample in images for im in sample])
    return self.vision(images)

  def embed(self, input_ids, token_type_ids, images):
    """Token embeddings with image features written into the vision-typed positions."""
    inputs_embeds = self.embed_tokens(input_ids)
    vision_positions = token_type_ids == VISION_TOKEN_TYPE
    if _has_images(images):
      feats = self.encode_images(images)
      feats = feats.reshape(-1, feats.shape[-1]).to(inputs_embeds.dtype)
      n = int(vision_positions.sum())
      if n != feats.shape[0]:
        raise ValueError(f"{n} vision-typed positions but {feats.shape[0]} image feature rows")
      inputs_embeds = inputs_embeds.index_put((vision_positions,), feats)
    elif bool(vision_positions.any()):
      raise ValueError("vision-typed tokens without images")
    return inputs_embeds

  def forward(self, input_ids, token_type_ids=None, attention_mask=None, images=None,
              position_ids=None, past_key_values=None, use_cache=False,
              output_hidden_states=False):
    b, l = input_ids.shape
    if token_type_ids is None:
      token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
    past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
    if past_key_values is None:
      hidden = self.embed(input_ids, token_type_ids, images)
    else:  # cached decoding: images were spliced in on the first step
      hidden = self.embed_tokens(input_ids)
    if attention_mask is None:
      attention_mask = torch.ones(b, past_len + l, dtype=torch.long, device=input_ids.device)
    if position_ids is None:
      if past_key_values is None:
        position_ids = build_position_ids(token_type_ids, attention_mask)
      else:  # the original llm_forward's fallback
        position_ids = torch.arange(past_len, past_len + l, device=input_ids.device)
        position_ids = position_ids[None].expand(b, -1)
    mask = make_attention_mask(attention_mask, l, past_len, hidden.dtype)

    all_hidden = []
    presents = []
    for i, layer in enumerate(self.layers):
      if output_hidden_states:
        all_hidden.append(hidden)
      past = None if past_key_values is None else past_key_values[i]
      hidden, present = layer(hidden, token_type_ids, position_ids, mask, past, use_cache)
      presents.append(present)
    hidden = self.norm(hidden)
    if output_hidden_states:
      all_hidden.append(hidden)
    return ModelOutput(last_hidden_state=hidden,
                       past_key_values=tuple(presents) if use_cache else None,
                       hidden_states=tuple(all_hidden) if output_hidden_states else None)


def _has_images(images) -> bool:
  if images is None:
    return False
  if isinstance(images, torch.Tensor):
    return images.shape[0] > 0
  return any(len(s) > 0 for s in images)


class CogVLMForCausalLM(nn.Module):
  """The whole model, built from an original ``config.json`` dict."""

  def __init__(self, hf_config: dict):
    super().__init__()
    self.config = dict(hf_config)
    self.variant = detect_variant(hf_config)
    self.model = CogVLMModel(hf_config)
    self.lm_head = nn.Linear(hf_config["hidden_size"], hf_config["vocab_size"], bias=False)

  def encode_vision_tower(self, images: torch.Tensor) -> torch.Tensor:
    """EVA2-CLIP output before downsample/adapter, CLS dropped: [B, g^2, Cv]."""
    return self.model.vision.encode_vision_tower(images)

  def forward(self, input_ids, token_type_ids=None, attention_mask=None, images=None,
              position_ids=None, past_key_values=None, use_cache=False,
              output_hidden_states=False, labels=None):
    out = self.model(input_ids, token_type_ids, attention_mask, images, position_ids,
                     past_key_values, use_cache, output_hidden_states)
    logits = self.lm_head(out.last_hidden_state).float()
    loss = None
    if labels is not None:  # original: shift by one, CrossEntropyLoss (ignore_index -100)
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    return ModelOutput(logits=logits, loss=loss, past_key_values=out.past_key_values,
                       hidden_states=out.hidden_states)


# ============================================================================================
# Initialisation and generation
# ============================================================================================

def _is_norm_weight(name: str) -> bool:
  return (name.endswith(("layernorm.weight", "norm1.weight", ".norm.weight"))
          or name == "norm.weight")


@torch.no_grad()
def init_random_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
  """Seeded non-trivial weights: every parameter ~ N(0, std) (biases, cls, position table,
  boi/eoi included); norm weights 1 + 0.1 * N(0, 1). ``inv_freq`` buffers are left alone."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
    if _is_norm_weight(name):
      value = 1.0 + 0.1 * noise
    else:
      value = std * noise
    p.copy_(value.to(p.dtype))
  return model


@torch.no_grad()
def generate_greedy(model: CogVLMForCausalLM, input_ids, token_type_ids, attention_mask, images,
                    max_new_tokens: int, eos_token_id: int, pad_token_id: Optional[int] = None,
                    use_cache: bool = True) -> torch.LongTensor:
  """Greedy decoding (spec section 9) -> [B, L + new].

  Step 0 runs the full prompt (with images); later steps feed only the last token with the KV
  cache. Position ids are recomputed every step from the full token_type_ids/attention_mask
  (extended with language / 1) and the last one is used. Rows that produced eos keep emitting
  ``pad_token_id`` (default: eos). Stops when every row has finished or after max_new_tokens.
  ``use_cache=False`` runs a full forward over the whole sequence every step (for testing).
  """
  if pad_token_id is None:
    pad_token_id = eos_token_id
  b = input_ids.shape[0]
  if token_type_ids is None:
    token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
  if attention_mask is None:
    attention_mask = torch.ones_like(input_ids)
  ids, tti, mask = input_ids, token_type_ids, attention_mask
  unfinished = torch.ones(b, dtype=torch.bool, device=ids.device)
  past = None
  for _ in range(max_new_tokens):
    pos = build_position_ids(tti, mask)
    if past is None or not use_cache:
      out = model(ids, tti, mask, images, pos, None, use_cache=use_cache)
    else:
      out = model(ids[:, -1:], tti[:, -1:], mask, None, pos[:, -1:], past, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
    ids = torch.cat([ids, nxt[:, None]], dim=1)
    tti = torch.cat([tti, torch.full_like(nxt[:, None], LANGUAGE_TOKEN_TYPE)], dim=1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    unfinished = unfinished & (nxt != eos_token_id)
    if not bool(unfinished.any()):
      break
  return ids


__all__ = [
    "LANGUAGE_TOKEN_TYPE", "VISION_TOKEN_TYPE", "ModelOutput", "detect_variant",
    "PatchEmbedding", "Attention", "MLP", "TransformerLayer", "Transformer", "GLU",
    "EVA2CLIPModel", "build_position_ids", "get_expert_mask", "RMSNorm", "RotaryEmbedding",
    "rotate_half", "apply_rotary_pos_emb", "VisionExpertAttention", "MLPExpert",
    "VisionExpertMLP", "CogVLMDecoderLayer", "make_attention_mask", "CogVLMModel",
    "CogVLMForCausalLM", "init_random_", "generate_greedy",
]
