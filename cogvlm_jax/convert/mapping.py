"""The one table that relates Hugging Face tensor names to cogvlm_jax parameters.

Each `TensorRule` says how one Hugging Face tensor (PyTorch [out, in] layout, fused QKV)
becomes one or more of our parameters (JAX [in, out] layout, q/k/v separate, per-layer
tensors stacked on a leading "layers" axis) and back. The transforms are transposes,
reshapes, splits and concatenations only, so a round trip is bit-exact in any dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from cogvlm_jax.config import CogVLMConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """hf_name -> our parameter(s) at `paths` (layer `layer` of a stack, or unstacked)."""

  hf_name: str
  hf_shape: tuple[int, ...]
  paths: tuple[Path, ...]
  layer: int | None
  # Our pieces of the tensor; views where possible (the caller copies them into place).
  to_ours: Callable[[np.ndarray], Sequence[np.ndarray]]
  # (pieces, alloc=np.empty) -> the tensor; `alloc(shape, dtype)` provides new arrays.
  to_hf: Callable[..., np.ndarray]


# Tile of a transposing copy: (rows, cols) of the destination. Tall and narrow: each tile
# reads 8 contiguous source rows of 1024 elements and writes 1024 short destination runs,
# which stays fast when the source row stride is a power of two (model widths are), where
# numpy's plain strided copy thrashes one cache set (measured ~8x faster for [5632, 2048]).
_TILE = (1024, 8)


def _as_2d(x: np.ndarray) -> np.ndarray | None:
  """A 2-D view of `x` ((d0, rest) or (rest, d_last)), or None when neither is a view."""
  for shape in ((x.shape[0], -1), (-1, x.shape[-1])):
    try:
      return np.reshape(x, shape, copy=False)  # raises instead of copying
    except ValueError:
      continue
  return None


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src, copied in tiles when src is a transposed view. Bit-exact (a copy)."""
  if src.ndim < 2 or src.size < _TILE[0] * _TILE[1] or src.flags.c_contiguous:
    dst[...] = src
    return
  s2 = _as_2d(src)
  d2 = _as_2d(dst) if s2 is not None else None
  if s2 is None or d2 is None or d2.shape != s2.shape:
    dst[...] = src
    return
  rows, cols = s2.shape
  bi, bj = _TILE
  for i in range(0, rows, bi):
    for j in range(0, cols, bj):
      d2[i:i + bi, j:j + bj] = s2[i:i + bi, j:j + bj]


def transpose2d(w: np.ndarray, alloc=np.empty) -> np.ndarray:
  """w.T as a new C-contiguous array (tiled copy)."""
  out = alloc(w.shape[::-1], w.dtype)
  copy_into(out, w.T)
  return out


def _same(x):
  return (x,)


def _same_back(xs, alloc=None):
  return xs[0]


def _linear(out_shape=None):
  """[out, in] -> [in, *out_shape] (reshape of the out dim, e.g. to [heads, head_dim])."""

  def to_ours(w):  # views; the caller copies them into place (`copy_into`)
    w = w.T
    return (w.reshape((w.shape[0],) + tuple(out_shape)) if out_shape else w,)

  def to_hf(xs, alloc=np.empty):
    w = xs[0]
    return transpose2d(w.reshape(w.shape[0], -1), alloc)

  return to_ours, to_hf


def _linear_in(in_shape):
  """Output projection [out, in] -> [*in_shape, out] (in = heads * head_dim)."""

  def to_ours(w):
    return (w.T.reshape(tuple(in_shape) + (w.shape[0],)),)

  def to_hf(xs, alloc=np.empty):
    w = xs[0]
    return transpose2d(w.reshape(-1, w.shape[-1]), alloc)

  return to_ours, to_hf


def _fused_qkv_weight(heads, kv_heads, head_dim):
  """[q | k | v, in] (head-major blocks) -> q [in, H, hd], k/v [in, KV, hd]."""
  sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)

  def to_ours(w):
    q, k, v = np.split(w, np.cumsum(sizes)[:2], axis=0)
    return (q.T.reshape(-1, heads, head_dim), k.T.reshape(-1, kv_heads, head_dim),
            v.T.reshape(-1, kv_heads, head_dim))

  def to_hf(xs, alloc=np.empty):
    flat = [x.reshape(x.shape[0], -1) for x in xs]  # [in, rows_i]
    out = alloc((sum(f.shape[1] for f in flat), flat[0].shape[0]), flat[0].dtype)
    start = 0
    for f in flat:
      copy_into(out[start:start + f.shape[1]], f.T)
      start += f.shape[1]
    return out

  return to_ours, to_hf


def _fused_qkv_bias(heads, kv_heads, head_dim):
  sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)

  def to_ours(b):
    q, k, v = np.split(b, np.cumsum(sizes)[:2])
    return q.reshape(heads, head_dim), k.reshape(kv_heads, head_dim), v.reshape(kv_heads,
                                                                                head_dim)

  def to_hf(xs, alloc=None):
    return np.concatenate([x.reshape(-1) for x in xs])

  return to_ours, to_hf


def _conv_oihw():
  """PyTorch conv [out, in, kh, kw] <-> HWIO [kh, kw, in, out]."""
  return (lambda w: (np.transpose(w, (2, 3, 1, 0)),),
          lambda xs, alloc=None: np.transpose(xs[0], (3, 2, 0, 1)))


def _reshape(hf_shape):
  return (lambda w: (w.reshape(-1) if len(hf_shape) > 1 else w,),
          lambda xs, alloc=None: xs[0].reshape(hf_shape))


def tensor_rules(cfg: CogVLMConfig) -> list[TensorRule]:
  """All rules of a model, in the original state dict's order."""
  d, f, h, kv, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
  vc = cfg.vision
  cv, fv, vh, vhd, p = (vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.head_dim,
                        vc.patch_size)
  q_rows = (h + 2 * kv) * hd
  rules: list[TensorRule] = []

  def add(hf_name, hf_shape, paths, fns, layer=None):
    rules.append(TensorRule(hf_name, tuple(hf_shape), tuple(paths), layer, *fns))

  add("model.embed_tokens.weight", (v, d), [("embed_tokens",)], (_same, _same_back))
  for i in range(cfg.num_hidden_layers):
    pre = f"model.layers.{i}."
    L = ("layers",)
    add(pre + "input_layernorm.weight", (d,), [L + ("input_layernorm", "weight")],
        (_same, _same_back), i)
    add(pre + "post_attention_layernorm.weight", (d,),
        [L + ("post_attention_layernorm", "weight")], (_same, _same_back), i)
    add(pre + "self_attn.rotary_emb.inv_freq", (hd // 2,), [L + ("self_attn", "inv_freq")],
        (_same, _same_back), i)
    for expert in ("vision", "language"):
      mod = L + ("self_attn", f"{expert}_expert_query_key_value")
      add(pre + f"self_attn.{expert}_expert_query_key_value.weight", (q_rows, d),
          [mod + ("query",), mod + ("key",), mod + ("value",)], _fused_qkv_weight(h, kv, hd), i)
      if expert == "vision" and cfg.vision_expert_qkv_bias:
        add(pre + "self_attn.vision_expert_query_key_value.bias", (q_rows,),
            [mod + ("query_bias",), mod + ("key_bias",), mod + ("value_bias",)],
            _fused_qkv_bias(h, kv, hd), i)
      add(pre + f"self_attn.{expert}_expert_dense.weight", (d, h * hd),
          [L + ("self_attn", f"{expert}_expert_dense", "kernel")], _linear_in((h, hd)), i)
    for expert in ("language", "vision"):
      mlp = L + ("mlp", f"{expert}_mlp")
      for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
        add(pre + f"mlp.{expert}_mlp.{name}.weight", shape, [mlp + (name,)], _linear(), i)
    if cfg.is_cogagent:
      _cross_attention_rules(cfg, pre, i, add)
  add("model.norm.weight", (d,), [("norm", "weight")], (_same, _same_back))

  vis = "model.vision."
  add(vis + "boi", (1, 1, d), [("adapter", "boi")], _reshape((1, 1, d)))
  add(vis + "eoi", (1, 1, d), [("adapter", "eoi")], _reshape((1, 1, d)))
  pe = ("vision", "patch_embedding")
  add(vis + "patch_embedding.cls_embedding", (1, cv), [pe + ("cls_embedding",)],
      _reshape((1, cv)))
  add(vis + "patch_embedding.proj.weight", (cv, vc.in_channels, p, p), [pe + ("proj_kernel",)],
      _conv_oihw())
  add(vis + "patch_embedding.proj.bias", (cv,), [pe + ("proj_bias",)], (_same, _same_back))
  add(vis + "patch_embedding.position_embedding.weight", (vc.num_positions, cv),
      [pe + ("position_embedding",)], (_same, _same_back))
  for j in range(vc.num_hidden_layers):
    pre = f"{vis}transformer.layers.{j}."
    L = ("vision", "layers")
    att = L + ("attention",)
    add(pre + "attention.query_key_value.weight", (3 * cv, cv),
        [att + ("query_kernel",), att + ("key_kernel",), att + ("value_kernel",)],
        _fused_qkv_weight(vh, vh, vhd), j)
    add(pre + "attention.query_key_value.bias", (3 * cv,),
        [att + ("query_bias",), att + ("key_bias",), att + ("value_bias",)],
        _fused_qkv_bias(vh, vh, vhd), j)
    add(pre + "attention.dense.weight", (cv, cv), [att + ("dense_kernel",)],
        _linear_in((vh, vhd)), j)
    add(pre + "attention.dense.bias", (cv,), [att + ("dense_bias",)], (_same, _same_back), j)
    add(pre + "mlp.fc1.weight", (fv, cv), [L + ("mlp", "fc1_kernel")], _linear(), j)
    add(pre + "mlp.fc1.bias", (fv,), [L + ("mlp", "fc1_bias")], (_same, _same_back), j)
    add(pre + "mlp.fc2.weight", (cv, fv), [L + ("mlp", "fc2_kernel")], _linear(), j)
    add(pre + "mlp.fc2.bias", (cv,), [L + ("mlp", "fc2_bias")], (_same, _same_back), j)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      for part in ("weight", "bias"):
        add(pre + f"{norm}.{part}", (cv,), [L + (norm, part)], (_same, _same_back), j)
  if cfg.downsample:
    add(vis + "conv.weight", (cv, cv, 2, 2), [("adapter", "conv", "kernel")], _conv_oihw())
    add(vis + "conv.bias", (cv,), [("adapter", "conv", "bias")], (_same, _same_back))
  glu = ("adapter", "linear_proj")
  add(vis + "linear_proj.linear_proj.weight", (d, cv), [glu + ("linear_proj",)], _linear())
  add(vis + "linear_proj.norm1.weight", (d,), [glu + ("norm1", "weight")], (_same, _same_back))
  add(vis + "linear_proj.norm1.bias", (d,), [glu + ("norm1", "bias")], (_same, _same_back))
  add(vis + "linear_proj.gate_proj.weight", (f, d), [glu + ("gate_proj",)], _linear())
  add(vis + "linear_proj.dense_h_to_4h.weight", (f, d), [glu + ("dense_h_to_4h",)], _linear())
  add(vis + "linear_proj.dense_4h_to_h.weight", (d, f), [glu + ("dense_4h_to_h",)], _linear())
  if cfg.is_cogagent:
    add(vis + "pos_embed", (vc.grid_size**2, cv), [("adapter", "pos_embed")],
        (_same, _same_back))
    _cross_vision_rules(cfg, add)
  add("lm_head.weight", (v, d), [("lm_head",)], _linear())
  return rules


# ---- CogAgent ---------------------------------------------------------------------------


def _split_rows(parts: int, heads: int, head_dim: int):
  """[parts * heads * head_dim, in] (e.g. key_value: [k | v], head-major) -> `parts` arrays
  [in, heads, head_dim], and back."""

  def to_ours(w):
    return tuple(p.T.reshape(-1, heads, head_dim) for p in np.split(w, parts, axis=0))

  def to_hf(xs, alloc=np.empty):
    flat = [x.reshape(x.shape[0], -1) for x in xs]  # [in, rows]
    out = alloc((sum(x.shape[1] for x in flat), flat[0].shape[0]), flat[0].dtype)
    start = 0
    for x in flat:
      copy_into(out[start:start + x.shape[1]], x.T)
      start += x.shape[1]
    return out

  return to_ours, to_hf


def _heads(heads: int, head_dim: int):
  """A flat bias [heads * head_dim] <-> [heads, head_dim]."""
  return (lambda w: (w.reshape(heads, head_dim),), lambda xs, alloc=None: xs[0].reshape(-1))


def _cross_attention_rules(cfg: CogVLMConfig, pre: str, i: int, add) -> None:
  """A CogAgent decoder layer's four extra tensors (cross-attention and its norm)."""
  d, h, hc, cx = (cfg.hidden_size, cfg.num_attention_heads, cfg.cross_head_dim,
                  cfg.cross_vision.width)
  cc = h * hc
  L = ("layers",)
  add(pre + "post_cross_attention_layernorm.weight", (d,),
      [L + ("post_cross_attention_layernorm", "weight")], (_same, _same_back), i)
  ca = L + ("cross_attn",)
  add(pre + "cross_attn.query.weight", (cc, d), [ca + ("query",)], _linear((h, hc)), i)
  add(pre + "cross_attn.key_value.weight", (2 * cc, cx), [ca + ("key",), ca + ("value",)],
      _split_rows(2, h, hc), i)
  add(pre + "cross_attn.dense.weight", (d, cc), [ca + ("dense",)], _linear_in((h, hc)), i)


def _cross_vision_rules(cfg: CogVLMConfig, add) -> None:
  """`model.cross_vision.*`: the EVA2-CLIP-L tower (all stored blocks, its unused norm and
  head, one copy of the RoPE tables) and the table added after it."""
  c = cfg.cross_vision
  cx, n, heads, dx, fx, p = (c.width, c.num_tokens, c.num_heads, c.head_width, c.mlp_width,
                             c.patch_size)
  top = "model.cross_vision."
  vit = top + "vit.model."
  X = ("cross_vision",)
  add(top + "pos_embed", (n, cx), [X + ("pos_embed",)], (_same, _same_back))
  add(vit + "cls_token", (1, 1, cx), [X + ("cls_token",)], _reshape((1, 1, cx)))
  add(vit + "pos_embed", (1, n + 1, cx), [X + ("vit_pos_embed",)],
      (lambda w: (w[0],), lambda xs, alloc=None: xs[0][None]))
  add(vit + "patch_embed.proj.weight", (cx, 3, p, p), [X + ("patch_proj",)], _conv_oihw())
  add(vit + "patch_embed.proj.bias", (cx,), [X + ("patch_proj_bias",)], (_same, _same_back))
  for name in ("freqs_cos", "freqs_sin"):
    add(vit + f"rope.{name}", (n, dx), [X + ("rope", name)], (_same, _same_back))
  B = X + ("blocks",)
  for j in range(c.layers):
    pre = f"{vit}blocks.{j}."
    for norm in ("norm1", "norm2"):
      for part in ("weight", "bias"):
        add(pre + f"{norm}.{part}", (cx,), [B + (norm, part)], (_same, _same_back), j)
    att = B + ("attn",)
    for name in ("q_proj", "k_proj", "v_proj"):
      add(pre + f"attn.{name}.weight", (cx, cx), [att + (name,)], _linear((heads, dx)), j)
    for name in ("q_bias", "v_bias"):
      add(pre + f"attn.{name}", (cx,), [att + (name,)], _heads(heads, dx), j)
    for part in ("weight", "bias"):
      add(pre + f"attn.inner_attn_ln.{part}", (cx,), [att + ("inner_attn_ln", part)],
          (_same, _same_back), j)
    add(pre + "attn.proj.weight", (cx, cx), [att + ("proj",)], _linear_in((heads, dx)), j)
    add(pre + "attn.proj.bias", (cx,), [att + ("proj_bias",)], (_same, _same_back), j)
    mlp = B + ("mlp",)
    for name, shape in (("w1", (fx, cx)), ("w2", (fx, cx))):
      add(pre + f"mlp.{name}.weight", shape, [mlp + (name,)], _linear(), j)
      add(pre + f"mlp.{name}.bias", (fx,), [mlp + (f"{name}_bias",)], (_same, _same_back), j)
    for part in ("weight", "bias"):
      add(pre + f"mlp.ffn_ln.{part}", (fx,), [mlp + ("ffn_ln", part)], (_same, _same_back), j)
    add(pre + "mlp.w3.weight", (cx, fx), [mlp + ("w3",)], _linear(), j)
    add(pre + "mlp.w3.bias", (cx,), [mlp + ("w3_bias",)], (_same, _same_back), j)
  for part in ("weight", "bias"):
    add(vit + f"norm.{part}", (cx,), [X + ("norm", part)], (_same, _same_back))
  add(vit + "head.weight", (c.head_size, cx), [X + ("head",)], _linear())
  add(vit + "head.bias", (c.head_size,), [X + ("head_bias",)], (_same, _same_back))
