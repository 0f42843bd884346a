"""PyTorch reference of CogAgent-18B: the test oracle for the JAX port's CogAgent.

Written from /work/shared/cogagent_spec.md (facts about the original Hugging Face
``modeling_cogagent.py`` / ``cross_visual.py`` / ``visual.py`` of ``THUDM/cogagent-chat-hf``),
NOT copied from the original code. Everything the spec says is "exactly CogVLM v1" (the
low-resolution tower, the GLU, position ids, expert routing, the self-attention, the MLP,
masks) is taken from the CogVLM reference (`modeling_cogvlm_ref`). Module and parameter names
follow the original, so ``state_dict()`` has exactly the released checkpoint's keys and
shapes (spec section 6), with ONE copy of the 2D RoPE tables (the original's aliases under
every block's ``attn.rope`` are not registered: they are not in checkpoints).

Deliberate differences from the original, none of which changes the math:

* attention is explicit matmuls + float32 softmax (the original uses xformers in the towers;
  exact softmax attention, no mask);
* ``images`` / ``cross_images`` are tensors [B, 3, S, S] / [B, 3, Sx, Sx] (one per sample);
* ``generate_greedy`` is a small stand-alone greedy loop with a tuple cache per layer
  (k_self, v_self, k_cross, v_cross), spec section 5.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference import modeling_cogvlm_ref as v1
from tests.reference.modeling_cogvlm_ref import (LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE,
                                                 ModelOutput, build_position_ids, init_random_,
                                                 make_attention_mask)

# The values the original hard-codes for the high-resolution tower (spec section 2).
CROSS_VISION_DEFAULTS = dict(layers=24, width=1024, head_width=64, mlp_ratio=2.6667,
                             patch_size=14, pt_hw_seq_len=16)
HEAD_WIDTH = 768  # the stored, unused CLIP head's out width


def cross_vision_config(hf_config: dict) -> dict:
  """The tower's hyper-parameters: `cross_vision_config` over the hard-coded values."""
  cfg = dict(CROSS_VISION_DEFAULTS, **(hf_config.get("cross_vision_config") or {}))
  cfg["image_size"] = hf_config.get("cross_image_size", 1120)
  return cfg


# ============================================================================================
# Low-resolution tower: CogVLM's EVA2-CLIP-E + `pos_embed` before the GLU (spec section 1)
# ============================================================================================

class EVA2CLIPModel(v1.EVA2CLIPModel):

  def __init__(self, hf_config: dict):
    super().__init__(hf_config)
    vc = hf_config["vision_config"]
    g = vc["image_size"] // vc["patch_size"]
    self.pos_embed = nn.Parameter(torch.zeros(g * g, vc["hidden_size"]))

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.encode_vision_tower(images)  # CLS already dropped
    x = self.linear_proj(x + self.pos_embed.unsqueeze(0))
    boi = self.boi.expand(x.shape[0], -1, -1)
    eoi = self.eoi.expand(x.shape[0], -1, -1)
    return torch.cat([boi, x, eoi], dim=1)


# ============================================================================================
# High-resolution tower: EVA2-CLIP-L with 2D RoPE (spec section 2)
# ============================================================================================

class VisionRotaryEmbeddingFast(nn.Module):
  """The 2D RoPE tables [N, dx] (stored buffers) and their interleaved-pair application."""

  def __init__(self, head_width: int, grid: int, pt_seq_len: int):
    super().__init__()
    dim = head_width // 2  # per axis
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    t = torch.arange(grid, dtype=torch.float32) / grid * pt_seq_len
    freqs = torch.einsum("i,f->if", t, freqs)  # [G, dim/2]
    freqs = freqs.repeat_interleave(2, dim=-1)  # each frequency on two adjacent dims
    row = freqs[:, None, :].expand(grid, grid, dim)
    col = freqs[None, :, :].expand(grid, grid, dim)
    angles = torch.cat([row, col], dim=-1).reshape(grid * grid, 2 * dim)
    self.register_buffer("freqs_cos", angles.cos(), persistent=True)
    self.register_buffer("freqs_sin", angles.sin(), persistent=True)

  @staticmethod
  def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]."""
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(-1)
    return torch.stack([-x2, x1], dim=-1).flatten(-2)

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    """t [B, heads, N, dx] (patch tokens only)."""
    return t * self.freqs_cos + self.rotate_pairs(t) * self.freqs_sin


class CrossVisionAttention(nn.Module):
  """`attn`: q/k/v_proj (no bias) + q_bias, v_bias; RoPE on patches; inner_attn_ln; proj."""

  def __init__(self, width: int, head_width: int):
    super().__init__()
    self.num_heads = width // head_width
    self.head_dim = head_width
    self.scale = head_width**-0.5
    self.q_proj = nn.Linear(width, width, bias=False)
    self.k_proj = nn.Linear(width, width, bias=False)
    self.v_proj = nn.Linear(width, width, bias=False)
    self.q_bias = nn.Parameter(torch.zeros(width))
    self.v_bias = nn.Parameter(torch.zeros(width))
    self.inner_attn_ln = nn.LayerNorm(width, eps=1e-6)
    self.proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor, rope: VisionRotaryEmbeddingFast) -> torch.Tensor:
    b, n, c = x.shape

    def heads(t):
      return t.reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
    k = heads(F.linear(x, self.k_proj.weight))  # no key bias
    v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
    # RoPE on the patch tokens only; CLS (index 0) is left as it is.
    q = torch.cat([q[:, :, :1], rope(q[:, :, 1:])], dim=2)
    k = torch.cat([k[:, :, :1], rope(k[:, :, 1:])], dim=2)
    scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, c)
    return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
  """`mlp`: w3(ffn_ln(SiLU(w1(x)) * w2(x))), all with biases."""

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.w1 = nn.Linear(width, hidden)
    self.w2 = nn.Linear(width, hidden)
    self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
    self.w3 = nn.Linear(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
  """Pre-norm: x += attn(norm1(x)); x += mlp(norm2(x))."""

  def __init__(self, width: int, head_width: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = CrossVisionAttention(width, head_width)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = SwiGLU(width, int(width * mlp_ratio))

  def forward(self, x, rope):
    x = x + self.attn(self.norm1(x), rope)
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):

  def __init__(self, patch: int, width: int):
    super().__init__()
    self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, Cx], p = r * G + c


class EVAVisionTransformer(nn.Module):
  """`vit.model`: patch_embed, cls_token, pos_embed, rope, blocks, (unused) norm and head."""

  def __init__(self, cc: dict):
    super().__init__()
    width, grid = cc["width"], cc["image_size"] // cc["patch_size"]
    self.image_size = cc["image_size"]
    self.patch_embed = PatchEmbed(cc["patch_size"], width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
    self.rope = VisionRotaryEmbeddingFast(cc["head_width"], grid, cc["pt_hw_seq_len"])
    self.blocks = nn.ModuleList([Block(width, cc["head_width"], cc["mlp_ratio"])
                                 for _ in range(cc["layers"])])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, HEAD_WIDTH)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, Sx, Sx] -> [B, N + 1, Cx] after all blocks but the last (no norm, no head)."""
    assert images.shape[-1] == self.image_size and images.shape[-2] == self.image_size
    x = self.patch_embed(images)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + self.pos_embed
    for block in self.blocks[:-1]:  # the last stored block is skipped
      x = block(x, self.rope)
    return x


class _Vit(nn.Module):
  def __init__(self, cc: dict):
    super().__init__()
    self.model = EVAVisionTransformer(cc)


class CrossVisionModel(nn.Module):
  """`model.cross_vision`: vit.model, then CLS dropped and `pos_embed` [N, Cx] added."""

  def __init__(self, hf_config: dict):
    super().__init__()
    cc = cross_vision_config(hf_config)
    grid = cc["image_size"] // cc["patch_size"]
    self.vit = _Vit(cc)
    self.pos_embed = nn.Parameter(torch.zeros(grid * grid, cc["width"]))

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.vit.model(images.to(self.pos_embed.dtype))[:, 1:]
    return x + self.pos_embed.unsqueeze(0)


# ============================================================================================
# Decoder with cross-attention (spec section 3)
# ============================================================================================

class CrossAttention(nn.Module):
  """`cross_attn`: query, key_value ([k | v]), dense; no biases, no routing, no mask."""

  def __init__(self, hf_config: dict):
    super().__init__()
    d, self.cc = hf_config["hidden_size"], hf_config.get("cross_compute_hidden_size", 1024)
    cx = hf_config.get("cross_hidden_size", 1024)
    self.num_heads = hf_config["num_attention_heads"]
    self.head_dim = self.cc // self.num_heads
    self.query = nn.Linear(d, self.cc, bias=False)
    self.key_value = nn.Linear(cx, 2 * self.cc, bias=False)
    self.dense = nn.Linear(self.cc, d, bias=False)

  def key_values(self, cross: torch.Tensor):
    """E [B, N, Cx] -> k, v [B, H, N, hc]."""
    b, n, _ = cross.shape
    kv = self.key_value(cross)
    k, v = kv[..., :self.cc], kv[..., self.cc:]
    return (k.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2),
            v.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2))

  def forward(self, x, cross=None, past=None):
    """x [B, L, D]; cross E or past (k, v). Returns (out, (k, v))."""
    b, l, _ = x.shape
    k, v = past if past is not None else self.key_values(cross)
    q = self.query(x).reshape(b, l, self.num_heads, self.head_dim).transpose(1, 2)
    scores = torch.matmul(q / math.sqrt(self.head_dim), k.transpose(-1, -2))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, l, self.cc)
    return self.dense(ctx), (k, v)


class CogAgentDecoderLayer(nn.Module):

  def __init__(self, hf_config: dict):
    super().__init__()
    d, eps = hf_config["hidden_size"], hf_config.get("rms_norm_eps", 1e-6)
    self.self_attn = v1.VisionExpertAttention(hf_config)
    self.cross_attn = CrossAttention(hf_config)
    self.mlp = v1.VisionExpertMLP(hf_config)
    self.input_layernorm = v1.RMSNorm(d, eps)
    self.post_attention_layernorm = v1.RMSNorm(d, eps)
    self.post_cross_attention_layernorm = v1.RMSNorm(d, eps)

  def forward(self, h, token_type_ids, position_ids, attention_mask, cross, past=None,
              use_cache=False):
    self_past = None if past is None else past[:2]
    cross_past = None if past is None else past[2:]
    attn, present = self.self_attn(self.input_layernorm(h), token_type_ids, position_ids,
                                   attention_mask, self_past, use_cache)
    h = h + attn
    cross_out, cross_kv = self.cross_attn(self.post_cross_attention_layernorm(h), cross,
                                          cross_past)
    h = h + cross_out
    h = h + self.mlp(self.post_attention_layernorm(h), token_type_ids)
    return h, (tuple(present) + tuple(cross_kv)) if use_cache else None


class CogAgentModel(nn.Module):

  def __init__(self, hf_config: dict):
    super().__init__()
    d = hf_config["hidden_size"]
    self.embed_tokens = nn.Embedding(hf_config["vocab_size"], d)
    self.layers = nn.ModuleList(
        [CogAgentDecoderLayer(hf_config) for _ in range(hf_config["num_hidden_layers"])])
    self.norm = v1.RMSNorm(d, hf_config.get("rms_norm_eps", 1e-6))
    self.vision = EVA2CLIPModel(hf_config)
    self.cross_vision = CrossVisionModel(hf_config)

  def embed(self, input_ids, token_type_ids, images):
    inputs_embeds = self.embed_tokens(input_ids)
    vision_positions = token_type_ids == VISION_TOKEN_TYPE
    feats = self.vision(images).to(inputs_embeds.dtype)
    feats = feats.reshape(-1, feats.shape[-1])
    if int(vision_positions.sum()) != feats.shape[0]:
      raise ValueError("vision-typed positions do not match the image features")
    return inputs_embeds.index_put((vision_positions,), feats)

  def forward(self, input_ids, token_type_ids, attention_mask=None, images=None,
              cross_images=None, position_ids=None, past_key_values=None, use_cache=False,
              output_hidden_states=False):
    b, l = input_ids.shape
    past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
    if past_key_values is None:  # the towers run once per prompt, at the prefill
      if images is None or cross_images is None:
        raise ValueError("CogAgent needs images and cross_images")
      hidden = self.embed(input_ids, token_type_ids, images)
      cross = self.cross_vision(cross_images).to(hidden.dtype)
    else:
      hidden, cross = self.embed_tokens(input_ids), None
    if attention_mask is None:
      attention_mask = torch.ones(b, past_len + l, dtype=torch.long)
    if position_ids is None:
      position_ids = build_position_ids(token_type_ids, attention_mask)
    mask = make_attention_mask(attention_mask, l, past_len, hidden.dtype)
    all_hidden, presents = [], []
    for i, layer in enumerate(self.layers):
      if output_hidden_states:
        all_hidden.append(hidden)
      past = None if past_key_values is None else past_key_values[i]
      hidden, present = layer(hidden, token_type_ids, position_ids, mask, cross, past,
                              use_cache)
      presents.append(present)
    hidden = self.norm(hidden)
    if output_hidden_states:
      all_hidden.append(hidden)
    return ModelOutput(last_hidden_state=hidden,
                       past_key_values=tuple(presents) if use_cache else None,
                       hidden_states=tuple(all_hidden) if output_hidden_states else None)


class CogAgentForCausalLM(nn.Module):
  """The whole model, built from an original CogAgent ``config.json`` dict."""

  def __init__(self, hf_config: dict):
    super().__init__()
    if hf_config.get("cross_compute_hidden_size", 1024) != hf_config.get("cross_hidden_size",
                                                                         1024):
      raise ValueError("the original only runs when cross_compute_hidden_size equals "
                       "cross_hidden_size")
    self.config = dict(hf_config)
    self.model = CogAgentModel(hf_config)
    self.lm_head = nn.Linear(hf_config["hidden_size"], hf_config["vocab_size"], bias=False)

  def forward(self, input_ids, token_type_ids, attention_mask=None, images=None,
              cross_images=None, position_ids=None, past_key_values=None, use_cache=False,
              output_hidden_states=False):
    out = self.model(input_ids, token_type_ids, attention_mask, images, cross_images,
                     position_ids, past_key_values, use_cache, output_hidden_states)
    return ModelOutput(logits=self.lm_head(out.last_hidden_state).float(),
                       past_key_values=out.past_key_values, hidden_states=out.hidden_states)


# ============================================================================================
# Prompts (spec section 8) and generation (spec section 5)
# ============================================================================================

def history_to_prompt(template_version: str, history, query: str) -> str:
  """The CogAgent ``_history_to_prompt`` (chat / chat_old / vqa / base)."""
  history = history or []
  if template_version == "chat":
    prompt = " [INST] "
    for q, r in history:
      prompt += f"{q} [/INST] {r} [INST] "
    return prompt + f"{query} [/INST] "
  if template_version == "chat_old":
    prompt = "<EOI>Question: "
    for q, r in history:
      prompt += f"{q} Answer: {r}\nQuestion: "
    return prompt + f"{query} Answer:"
  if template_version == "vqa":
    return "<EOI>Question: " + query + " Short answer:"
  if template_version == "base":
    return query
  raise ValueError(template_version)


@torch.no_grad()
def generate_greedy(model: CogAgentForCausalLM, input_ids, token_type_ids, attention_mask,
                    images, cross_images, max_new_tokens: int, eos_token_id: int,
                    use_cache: bool = True) -> torch.LongTensor:
  """Greedy decoding -> [B, L + new]; finished rows keep emitting eos. With the cache, later
  steps run neither tower (the cross K/V are reused); without it, a full forward per step."""
  ids, tti, mask = input_ids, token_type_ids, attention_mask
  unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
  past = None
  for _ in range(max_new_tokens):
    pos = build_position_ids(tti, mask)
    if past is None or not use_cache:
      out = model(ids, tti, mask, images, cross_images, pos, None, use_cache=use_cache)
    else:
      out = model(ids[:, -1:], tti[:, -1:], mask, None, None, pos[:, -1:], past,
                  use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    nxt = torch.where(unfinished, nxt, torch.full_like(nxt, eos_token_id))
    ids = torch.cat([ids, nxt[:, None]], dim=1)
    tti = torch.cat([tti, torch.full_like(nxt[:, None], LANGUAGE_TOKEN_TYPE)], dim=1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    unfinished = unfinished & (nxt != eos_token_id)
    if not bool(unfinished.any()):
      break
  return ids


__all__ = ["CogAgentForCausalLM", "CrossVisionModel", "history_to_prompt", "init_random_cogagent_",
           "generate_greedy", "cross_vision_config"]


_COGAGENT_NORMS = ("norm2.weight", "inner_attn_ln.weight", "ffn_ln.weight")


@torch.no_grad()
def init_random_cogagent_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
  """`init_random_` (every parameter ~ N(0, std), norm weights 1 + 0.1 N(0, 1)) with the
  tower's other LayerNorm weights treated as norms too; the RoPE buffers are left alone."""
  init_random_(model, seed, std)
  gen = torch.Generator().manual_seed(seed + 1)
  for name, p in model.named_parameters():
    if name.endswith(_COGAGENT_NORMS):
      p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
  return model
