"""Reading and writing `.safetensors` files ourselves, including bfloat16, one tensor at a time.

We read the format directly (8-byte header length, JSON header, raw little-endian data)
because `safetensors`' numpy backend cannot represent bfloat16, and its torch/flax backends
copy every tensor into a framework array first. Each tensor is read with `os.pread` into a
fresh buffer: unlike a memory map, whose touched pages stay in the process's resident set
until the whole file is unmapped, this keeps peak host memory at the tensors in flight.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
  """One `.safetensors` file: `names()`, `shape(name)`, `dtype(name)`, `get(name)`."""

  def __init__(self, path: str):
    self.path = path
    self._fd = None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: truncated safetensors file (no header)")
      (header_len,) = struct.unpack("<Q", head)
      if header_len > size - 8:
        raise ValueError(f"{path}: header length {header_len} exceeds file size {size}")
      try:
        self.header = json.loads(f.read(header_len))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
      self.metadata = self.header.pop("__metadata__", {}) or {}
      self._data_start = 8 + header_len
      for name, info in self.header.items():
        begin, end = info["data_offsets"]
        if self._data_start + end > size:
          raise ValueError(f"{path}: tensor {name!r} ends at byte {self._data_start + end} "
                           f"but the file has {size} bytes (truncated shard?)")
        if info["dtype"] not in DTYPES:
          raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    self._fd = os.open(path, os.O_RDONLY)

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(DTYPES[self.header[name]["dtype"]])

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    begin, end = info["data_offsets"]
    dtype = self.dtype(name)
    count = int(np.prod(info["shape"], dtype=np.int64))
    if (end - begin) != count * dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes, expected "
                       f"{count * dtype.itemsize} for shape {info['shape']} {info['dtype']}")
    buffer = bytearray(end - begin)
    view = memoryview(buffer)
    done = 0
    while done < len(buffer):  # pread may return fewer bytes than asked
      n = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
      if n <= 0:
        raise ValueError(f"{self.path}: unexpected end of file reading tensor {name!r}")
      done += n
    return np.frombuffer(buffer, dtype, count).reshape(info["shape"])

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.close()


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None) -> None:
  """Writes `tensors` (numpy, bf16 allowed) to `path` in the safetensors format."""
  header, offset = {}, 0
  for name, t in tensors.items():
    t = np.asarray(t)
    if t.dtype not in DTYPE_NAMES:
      raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be written to safetensors")
    header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in tensors.values():
      f.write(np.ascontiguousarray(t).tobytes())


def checkpoint_files(folder: str) -> list[str]:
  """The `.safetensors` files of a Hugging Face folder (index first, else all files)."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [p for p in files if not os.path.exists(os.path.join(folder, p))]
    if missing:
      raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
    return [os.path.join(folder, p) for p in files]
  files = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {folder}")
  return [os.path.join(folder, p) for p in files]


class SafetensorsCheckpoint:
  """All tensors of a (possibly sharded) folder by name, read lazily."""

  def __init__(self, folder: str):
    self.files = [SafetensorsFile(p) for p in checkpoint_files(folder)]
    self._where: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for name in f.names():
        self._where[name] = f

  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str):
    return self._where[name].shape(name)

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)

  def dtype(self, name: str) -> np.dtype:
    if name not in self._where:
      raise KeyError(f"tensor {name!r} is not in the checkpoint")
    return self._where[name].dtype(name)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._where:
      yield name, self.get(name)

  def close(self):
    for f in self.files:
      f.close()
