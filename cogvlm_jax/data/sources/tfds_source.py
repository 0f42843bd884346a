"""TFDS datasets as Grain random-access sources (ArrayRecord files; TensorFlow not needed).

`tfds.data_source` opens a prepared dataset's ArrayRecord files for random access and
decodes records with NumPy/PIL, so reading works without TensorFlow. Only the small
`tensorflow-datasets` package (and `array_record`, which Grain already needs) is required.
The dataset must already be prepared in `data_dir` (file_format="array_record"); this helper
does not download by default.
"""

from __future__ import annotations

from typing import Any, Optional


def tfds_source(name: str, split: str, data_dir: Optional[str] = None, *,
                download: bool = False, **kwargs: Any):
  """``tfds.data_source(name, split=split, data_dir=data_dir, ...)``: len() + [i] records.

  `download=False` (default): a dataset missing from `data_dir` is an error, not a silent
  download. Other keyword arguments (decoders=..., builder_kwargs=...) go to
  `tfds.data_source`. Raises ImportError naming the package when tensorflow-datasets is not
  installed.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        "tfds_source needs the `tensorflow-datasets` package (pip install "
        "tensorflow-datasets); TensorFlow itself is not needed to read ArrayRecord "
        "datasets") from e
  return tfds.data_source(name, split=split, data_dir=data_dir, download=download, **kwargs)
