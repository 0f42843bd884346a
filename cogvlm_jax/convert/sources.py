"""Hugging Face weight sources behind one small interface.

A source has `names()`, `shape(name)`, `dtype(name)`, `nbytes(name)`, `file_of(name)`,
`get(name) -> np.ndarray` and `close()`; shapes and dtypes come from headers, so a whole
checkpoint can be checked against a config before a single tensor is read.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from cogvlm_jax.convert.safetensors_io import SafetensorsCheckpoint
from cogvlm_jax.convert.torch_io import INDEX_NAME as BIN_INDEX, TorchBinCheckpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files that hold (or index) weights; everything else in a Hugging Face folder (modeling code,
# tokenizer, generation config) is carried along by the converter.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5",
                   ".index.json")


def weight_format(folder: str) -> str:
  """'safetensors' or 'bin' (safetensors preferred when both are present)."""
  names = os.listdir(folder)
  if SAFETENSORS_INDEX in names or any(n.endswith(".safetensors") for n in names):
    return "safetensors"
  if BIN_INDEX in names or any(n.endswith(".bin") for n in names):
    return "bin"
  raise FileNotFoundError(f"no weights in {folder}: expected *.safetensors (optionally with "
                          f"{SAFETENSORS_INDEX}) or PyTorch *.bin (optionally with {BIN_INDEX})")


def open_hf_checkpoint(folder: str):
  """A lazy tensor source over the weights of a Hugging Face folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
  if weight_format(folder) == "safetensors":
    return SafetensorsCheckpoint(folder)
  return TorchBinCheckpoint(folder)


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {folder}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def is_weight_file(name: str) -> bool:
  return name == "config.json" or name.endswith(WEIGHT_SUFFIXES)


class DictSource:
  """A source over an in-memory mapping name -> array (tests, `hf_to_state` on a dict)."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self._tensors = tensors

  def names(self):
    return list(self._tensors)

  def shape(self, name):
    return tuple(np.shape(self._tensors[name]))

  def dtype(self, name):
    return np.asarray(self._tensors[name]).dtype

  def nbytes(self, name):
    return np.asarray(self._tensors[name]).nbytes

  def file_of(self, name):
    return "<in memory>"

  def get(self, name):
    return np.asarray(self._tensors[name])

  def close(self):
    pass


def as_source(tensors):
  """Wraps a plain mapping; passes real sources (with `file_of`) through."""
  if hasattr(tensors, "file_of") and hasattr(tensors, "names"):
    return tensors
  if hasattr(tensors, "names") and hasattr(tensors, "get"):  # duck-typed: names/get/shape
    return _DuckSource(tensors)
  return DictSource(tensors)


class _DuckSource(DictSource):

  def __init__(self, src):
    self._src = src

  def names(self):
    return list(self._src.names())

  def shape(self, name):
    return tuple(self._src.shape(name)) if hasattr(self._src, "shape") else np.shape(
        self._src.get(name))

  def dtype(self, name):
    return np.dtype(self._src.dtype(name)) if hasattr(self._src, "dtype") else np.asarray(
        self._src.get(name)).dtype

  def nbytes(self, name):
    return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

  def get(self, name):
    return np.asarray(self._src.get(name))
