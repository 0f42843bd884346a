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
import re
import struct
from typing import Iterator, Sequence

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

  def nbytes(self, name: str) -> int:
    begin, end = self.header[name]["data_offsets"]
    return end - begin

  def get(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """Reads tensor `name`; into `out` (a uint8 buffer of at least its size) when given,
    in which case the result is a view of `out`."""
    info = self.header[name]
    begin, end = info["data_offsets"]
    dtype = self.dtype(name)
    count = int(np.prod(info["shape"], dtype=np.int64))
    if (end - begin) != count * dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes, expected "
                       f"{count * dtype.itemsize} for shape {info['shape']} {info['dtype']}")
    if out is not None and out.dtype == np.uint8 and out.size >= end - begin:
      buffer = out.reshape(-1)[:end - begin]
    else:
      buffer = np.empty(end - begin, np.uint8)
    view = memoryview(buffer)
    done = 0
    while done < len(buffer):  # pread may return fewer bytes than asked
      n = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
      if n <= 0:
        raise ValueError(f"{self.path}: unexpected end of file reading tensor {name!r}")
      done += n
    return buffer.view(dtype).reshape(info["shape"])

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
      f.write(_raw_bytes(t))


def _raw_bytes(t: np.ndarray) -> memoryview:
  """The bytes of `t` without a copy when it is contiguous (bf16 included, via a uint8 view)."""
  t = np.ascontiguousarray(t)
  return memoryview(t.reshape(-1).view(np.uint8))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
  """"5GB" -> 5 * 10^9 (decimal units like Hugging Face), "512MiB" -> 512 * 2^20, "1000" -> 1000."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
  size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if size <= 0:
    raise ValueError(f"size must be positive, got {text!r}")
  return size


def _header_blob(entries: Sequence[tuple[str, tuple, np.dtype]], metadata) -> bytes:
  header, offset = {}, 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  return blob + b" " * (-len(blob) % 8)


class ShardedSafetensorsWriter:
  """Writes a planned list of tensors into `model-0000i-of-0000n.safetensors` shards + index.

  The plan (names, shapes, dtypes, in the order the tensors will arrive) is known up front,
  so every shard's header is written first and each tensor is appended to its shard as it
  arrives; nothing is buffered beyond the tensor being written. Shards are filled like
  Hugging Face's `save_pretrained`: a new shard starts when the next tensor would take the
  current one past `max_shard_bytes` (a tensor larger than that gets a shard of its own).
  """

  def __init__(self, folder: str, plan: Sequence[tuple[str, tuple, np.dtype]],
               max_shard_bytes: int, metadata: dict | None = None):
    self.folder = folder
    self.metadata = {"format": "pt"} if metadata is None else metadata
    for name, _, dtype in plan:
      if np.dtype(dtype) not in DTYPE_NAMES:
        raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
      nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(entry)
      size += nbytes
    n = len(shards)
    self.shards = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]
    self._queue = [(file, e) for file, s in self.shards for e in s]
    self._next = 0
    self._file = None
    self._open_name = None
    self.bytes_written = 0

  def write(self, name: str, tensor: np.ndarray) -> None:
    """Appends the next planned tensor (must come in plan order, with the planned dtype/shape)."""
    if self._next >= len(self._queue):
      raise ValueError(f"tensor {name!r} was not planned")
    file, (want, shape, dtype) = self._queue[self._next]
    if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != np.dtype(dtype):
      raise ValueError(f"expected tensor {want} {tuple(shape)} {np.dtype(dtype)} next, got "
                       f"{name} {tuple(tensor.shape)} {tensor.dtype}")
    if file != self._open_name:
      self._close_file()
      entries = dict(self.shards)[file]
      self._file = open(os.path.join(self.folder, file), "wb")
      blob = _header_blob(entries, self.metadata)
      self._file.write(struct.pack("<Q", len(blob)))
      self._file.write(blob)
      self._open_name = file
    self._file.write(_raw_bytes(tensor))
    self.bytes_written += tensor.nbytes
    self._next += 1

  def _close_file(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> dict:
    """Finishes the last shard and writes `model.safetensors.index.json`; returns the index."""
    self._close_file()
    if self._next != len(self._queue):
      raise ValueError(f"{len(self._queue) - self._next} planned tensors were never written, "
                       f"first {self._queue[self._next][1][0]}")
    weight_map = {e[0]: file for file, entries in self.shards for e in entries}
    total = sum(int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
                for _, entries in self.shards for e in entries)
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
      f.write("\n")
    return index

  def abort(self):
    self._close_file()


def weight_files(folder: str, index_name: str, suffix: str) -> list[str]:
  """The weight files of a Hugging Face folder: those the index names, else all `*suffix`.

  Shared by the safetensors and the PyTorch `.bin` readers.
  """
  index = os.path.join(folder, index_name)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index}: not a valid index file ({e})") from e
    files = sorted(set(weight_map.values()))
    missing = [p for p in files if not os.path.exists(os.path.join(folder, p))]
    if missing:
      raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
    return [os.path.join(folder, p) for p in files]
  files = sorted(p for p in os.listdir(folder) if p.endswith(suffix))
  if not files:
    raise FileNotFoundError(f"no *{suffix} files in {folder}")
  return [os.path.join(folder, p) for p in files]


def checkpoint_files(folder: str) -> list[str]:
  """The `.safetensors` files of a Hugging Face folder (index first, else all files)."""
  return weight_files(folder, "model.safetensors.index.json", ".safetensors")


class SafetensorsCheckpoint:
  """All tensors of a (possibly sharded) folder by name, read lazily."""

  supports_out = True  # get(name, out=buffer) reads into a caller's buffer

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

  def get(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
    return self._where[name].get(name, out)

  def dtype(self, name: str) -> np.dtype:
    if name not in self._where:
      raise KeyError(f"tensor {name!r} is not in the checkpoint")
    return self._where[name].dtype(name)

  def nbytes(self, name: str) -> int:
    return self._where[name].nbytes(name)

  def file_of(self, name: str) -> str:
    """The file holding `name` (for error messages)."""
    return os.path.basename(self._where[name].path)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._where:
      yield name, self.get(name)

  def close(self):
    for f in self.files:
      f.close()
