"""Reading PyTorch `.bin` checkpoints (single or sharded with an index), safely and lazily.

Only `torch.load(..., weights_only=True)` is used: the restricted unpickler that accepts
tensors and plain containers and refuses arbitrary objects, so a malicious pickle cannot run
code. torch is imported only when a `.bin` checkpoint is actually opened.

Memory: shards saved by `torch.save` (zip format, torch >= 1.6) are memory-mapped
(`mmap=True`), and at most ONE shard is kept open at a time; reading a tensor copies it into
a fresh numpy array. The mapped pages of a shard stop counting once the shard is dropped, so
peak host memory stays near one shard plus the tensors in flight, even when tensors are read
in an order that jumps between shards (re-opening a mapped shard only re-reads its small
pickle). Legacy (pre-zip) files cannot be mapped and are loaded whole, one shard at a time.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from cogvlm_jax.convert.safetensors_io import weight_files

INDEX_NAME = "pytorch_model.bin.index.json"


def bin_checkpoint_files(folder: str) -> list[str]:
  """The `.bin` weight files of a folder: those named by the index, else all `*.bin`."""
  return weight_files(folder, INDEX_NAME, ".bin")


def _torch_to_numpy(name: str, path: str, tensor) -> np.ndarray:
  import torch

  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  if tensor.dtype not in (torch.float32, torch.float16, torch.float64, torch.int64,
                          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
    raise ValueError(f"{os.path.basename(path)}: tensor {name!r} has unsupported dtype "
                     f"{tensor.dtype}")
  return tensor.numpy().copy()


_NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                "float64": np.float64, "int64": np.int64, "int32": np.int32,
                "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


class TorchBinCheckpoint:
  """All tensors of a folder of PyTorch `.bin` shards by name, read lazily (one shard open)."""

  def __init__(self, folder: str):
    self.files = bin_checkpoint_files(folder)
    self._where: dict[str, str] = {}
    self._info: dict[str, tuple[tuple[int, ...], np.dtype | None, str]] = {}
    self._open_path: str | None = None
    self._open_dict: dict | None = None
    for path in self.files:
      state = self._load(path)
      for name, t in state.items():
        if name in self._where:
          raise ValueError(f"tensor {name!r} is in both {self._where[name]} and {path}")
        self._where[name] = path
        torch_dtype = str(t.dtype).replace("torch.", "")
        self._info[name] = (tuple(t.shape), np.dtype(_NUMPY_DTYPE[torch_dtype])
                            if torch_dtype in _NUMPY_DTYPE else None, torch_dtype)
      del state
      self._drop()

  def _load(self, path: str) -> dict:
    """The state dict of one shard (memory-mapped when possible); the only shard kept open."""
    if path == self._open_path:
      return self._open_dict
    self._drop()
    import torch

    try:
      try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError as e:
        if "mmap" not in str(e):
          raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
      # torch's message suggests weights_only=False; we never do that. Keep the reason.
      reason = [l.strip() for l in str(e).splitlines()
                if "GLOBAL" in l or "WeightsUnpickler error" in l]
      raise ValueError(f"{path}: refusing to load: the safe (weights_only) unpickler rejected "
                       f"it, so it holds more than tensors"
                       f"{': ' + reason[0] if reason else ''}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt "
                       f"shard?): {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in state.values()):
      raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    self._open_path, self._open_dict = path, state
    return state

  def _drop(self):
    self._open_path = None
    self._open_dict = None

  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._info[name][0]

  def dtype(self, name: str) -> np.dtype:
    shape, dtype, torch_dtype = self._info[name]
    if dtype is None:
      raise ValueError(f"{self.file_of(name)}: tensor {name!r} has unsupported dtype "
                       f"torch.{torch_dtype}")
    return dtype

  def nbytes(self, name: str) -> int:
    return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

  def file_of(self, name: str) -> str:
    return os.path.basename(self._where[name])

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    path = self._where[name]
    return _torch_to_numpy(name, path, self._load(path)[name])

  def close(self):
    self._drop()
