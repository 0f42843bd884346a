"""Random-access data sources for the VLM training formats (Grain `RandomAccessDataSource`s).

Each source has `__len__` and `__getitem__(i) -> dict` and pickles (for worker processes);
records are RAW — image bytes plus text / boxes / conversations, and a `source` + `key` that
name the sample in error messages. Decoding (`decode_image`) and tokenisation happen later,
in the pipeline. A record whose image cannot be read still comes back, with
`image_bytes=None` and an `error` string, so the pipeline can mask and count it.

    WebDatasetSource   LAION-style img2dataset .tar shards (indexed once, read with pread),
                       with metadata filters (MetadataFilter: size, aspect, similarity, ...)
    LlavaSource        LLaVA instruction JSON + image folder
    GuiSource          GUI screenshots with element boxes (LLaVA-style JSON + image folder)
    RefCocoSource      RefCOCO-style referring expressions (JSON), render_box for box text
    tfds_source        a prepared TFDS dataset (ArrayRecord), no TensorFlow needed
    ArrayRecordSource  raw records copied to ArrayRecord (write_arrayrecord) from a source
                       that cannot be read at random
    decode_image       bytes -> RGB PIL image or an error string; never raises for bad data
"""

from cogvlm_jax.data.sources.arrayrecord import ArrayRecordSource, write_arrayrecord
from cogvlm_jax.data.image_decoding import decode_image
from cogvlm_jax.data.sources.filters import MetadataFilter
from cogvlm_jax.data.sources.gui import GuiSource
from cogvlm_jax.data.sources.llava import LlavaSource, parse_conversation, strip_image_marker
from cogvlm_jax.data.sources.refcoco import RefCocoSource, clip_box, render_box
from cogvlm_jax.data.sources.tfds_source import tfds_source
from cogvlm_jax.data.sources.webdataset import (TarIndex, WebDatasetSource, load_tar_index,
                                                scan_tar)

__all__ = [
    "decode_image", "MetadataFilter", "LlavaSource", "GuiSource", "parse_conversation",
    "strip_image_marker", "RefCocoSource", "clip_box", "render_box", "tfds_source",
    "TarIndex", "WebDatasetSource", "load_tar_index", "scan_tar",
    "ArrayRecordSource", "write_arrayrecord",
]
