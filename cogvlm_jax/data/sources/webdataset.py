"""Random access to LAION-style webdataset shards, as img2dataset writes them.

A shard folder holds, per shard `{shard}` (e.g. 00000):

    {shard}.tar            members {key}.jpg|png|webp (image), {key}.txt (caption),
                           {key}.json (metadata: url, width, height, ...; grounding data may
                           hold boxes there too)
    {shard}.parquet        one row per attempted sample: key, url, caption, status, width,
                           height, original_width, original_height, ... (LAION columns such as
                           similarity / punsafe / pwatermark when img2dataset kept them)
    {shard}_stats.json     download counts (count, successes, failed_to_download, ...)

Tar files are streams, not random-access containers, so each shard is scanned ONCE with
`tarfile` to record where every member's bytes are — (key, ext) -> (data offset, size) — and
that index is cached as `{shard}.tar.idx.json` beside the shard (or in the user cache dir
when the folder is read-only; see `load_tar_index`). Reading a sample is then one `os.pread`
per member: no tarfile, no shared file position, safe from any thread or worker process.

Members are grouped into samples the webdataset way: key = member path up to the first "."
of its file name, ext = the rest. A sample is a key with an image; its caption is None when
it has no .txt (the pipeline decides what to do), its metadata None without a .json.

A truncated tar (an interrupted download or copy) is indexed up to its last complete member;
incomplete members are counted (`stats["truncated_members"]`) and logged, not fatal.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import tarfile
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from cogvlm_jax import fileio
from cogvlm_jax.data.sources.filters import (MetadataFilter, columns_from_dicts,
                                             read_parquet_columns)

log = logging.getLogger(__name__)

# Image extensions in order of preference when a key has several.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXT = "txt"
METADATA_EXT = "json"
INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"  # appended to the tar's name: 00000.tar.idx.json
_STATS_FIELDS = ("count", "successes", "failed_to_download", "failed_to_resize")

# One row per sample; -1 offsets/sizes mean "no such member".
_SAMPLE_DTYPE = np.dtype([
    ("shard", np.int32), ("image_ext", np.uint8),
    ("image_offset", np.int64), ("image_size", np.int64),
    ("text_offset", np.int64), ("text_size", np.int64),
    ("json_offset", np.int64), ("json_size", np.int64),
])


# ---- the per-shard index ---------------------------------------------------------------


@dataclasses.dataclass
class TarIndex:
  """Where each member's bytes are in one tar file.

  members: (key, ext, data offset, size) in tar order. tar_size / tar_mtime_ns identify the
  tar the index was built from (a changed file invalidates the cache). truncated: members
  that were cut off by the end of the file (not in `members`).
  """

  tar_size: int
  tar_mtime_ns: int
  members: list[tuple[str, str, int, int]]
  truncated: int = 0

  def to_json(self) -> bytes:
    return json.dumps({"version": INDEX_VERSION, "tar_size": self.tar_size,
                       "tar_mtime_ns": self.tar_mtime_ns, "truncated": self.truncated,
                       "members": self.members}, separators=(",", ":")).encode("utf-8")

  @classmethod
  def from_json(cls, data: bytes) -> "TarIndex":
    d = json.loads(data)
    if d.get("version") != INDEX_VERSION:
      raise ValueError(f"index version {d.get('version')} != {INDEX_VERSION}")
    return cls(int(d["tar_size"]), int(d["tar_mtime_ns"]),
               [(str(k), str(e), int(o), int(s)) for k, e, o, s in d["members"]],
               int(d.get("truncated", 0)))


def split_member_name(name: str) -> tuple[str, str]:
  """webdataset convention: "dir/000123.seg.png" -> ("dir/000123", "seg.png")."""
  folder, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  key = f"{folder}/{stem}" if folder else stem
  return key, ext if dot else ""


def scan_tar(path: str) -> TarIndex:
  """Reads the tar headers of `path` (no member data) into a TarIndex.

  Handles a truncated file: members whose data runs past the end, or a partial header at
  the end, are counted in `truncated` instead of raising. A file that is not an
  uncompressed tar (e.g. .tar.gz, which cannot be read at random) raises ValueError.
  """
  size, mtime_ns = fileio.stat(path)
  members: list[tuple[str, str, int, int]] = []
  truncated = 0
  if size == 0:
    log.warning("%s is empty (0 bytes); it holds no samples", path)
    return TarIndex(size, mtime_ns, members, 0)
  with fileio.open_binary(path) as f:
    try:
      tar = tarfile.open(fileobj=f, mode="r:")  # "r:" = no compression: offsets are real
    except tarfile.ReadError as e:
      raise ValueError(f"{path} is not an uncompressed tar file ({e}); random access needs "
                       f"plain .tar shards") from e
    at_end = False  # True when tarfile stopped by itself (no exception)
    while True:
      try:
        info = tar.next()
      except tarfile.ReadError as e:
        # tarfile checks that the previous member's data is complete before reading the next
        # header; a member already counted as truncated explains this error. Otherwise the
        # file ends inside a header.
        truncated = max(truncated, 1)
        log.debug("%s: stopped reading headers: %s", path, e)
        break
      if info is None:
        at_end = True
        break
      tar.members = []  # tarfile keeps every TarInfo; we record what we need ourselves
      if not info.isfile():
        continue
      if info.offset_data + info.size > size:
        truncated += 1
        continue
      key, ext = split_member_name(info.name)
      members.append((key, ext, info.offset_data, info.size))
    if at_end:
      # tarfile also ends quietly at a partial or garbled header; tell that apart from the
      # zero blocks that close a complete archive.
      f.seek(tar.offset)
      if f.read(tarfile.BLOCKSIZE).strip(b"\0"):
        truncated += 1
  if truncated:
    log.warning("%s is truncated: %d incomplete member(s) skipped, %d complete member(s) "
                "indexed", path, truncated, len(members))
  return TarIndex(size, mtime_ns, members, truncated)


def _index_locations(tar_path: str, index_dir: Optional[str]) -> list[str]:
  """Where an index may be cached, in order of preference."""
  name = os.path.basename(tar_path.rstrip("/")) + INDEX_SUFFIX
  fallback = os.path.join(fileio.user_cache_dir("tar_index"),
                          f"{fileio.path_digest(tar_path)}-{name}")
  if index_dir is not None:
    return [os.path.join(index_dir, f"{fileio.path_digest(tar_path)}-{name}")]
  return [tar_path + INDEX_SUFFIX, fallback]


def load_tar_index(tar_path: str, *, index_dir: Optional[str] = None,
                   rebuild: bool = False) -> tuple[TarIndex, str, str]:
  """The index of one tar: (index, "reused" | "built", where it is cached).

  A cached index is reused when its recorded tar size and mtime match the tar's now;
  otherwise the tar is scanned and the index written atomically (a concurrent reader sees
  the old file or the new one, never half of one). Cache location: `index_dir` when given,
  else `{tar}.idx.json` beside the tar, falling back to the user cache dir
  (`$COGVLM_JAX_CACHE_DIR`, `$XDG_CACHE_HOME/cogvlm_jax` or `~/.cache/cogvlm_jax`, under
  tar_index/) when the data folder cannot be written.
  """
  size, mtime_ns = fileio.stat(tar_path)
  locations = _index_locations(tar_path, index_dir)
  if not rebuild:
    for loc in locations:
      try:
        index = TarIndex.from_json(fileio.read_bytes(loc))
      except FileNotFoundError:
        continue
      except (OSError, ValueError, KeyError, TypeError) as e:
        log.info("ignoring unreadable index %s (%s)", loc, e)
        continue
      if index.tar_size == size and index.tar_mtime_ns == mtime_ns:
        return index, "reused", loc
  index = scan_tar(tar_path)
  data = index.to_json()
  errors = []
  for loc in locations:
    try:
      if not fileio.is_remote(loc):
        os.makedirs(os.path.dirname(os.path.abspath(loc)), exist_ok=True)
      fileio.write_atomic(loc, data)
      return index, "built", loc
    except (OSError, ImportError) as e:  # read-only folder, bucket without write access, ...
      errors.append(f"{loc}: {e}")
  log.warning("could not cache the index of %s (%s); it will be rebuilt next time", tar_path,
              "; ".join(errors))
  return index, "built", ""


# ---- the source ------------------------------------------------------------------------


def _sibling(tar_path: str, suffix: str) -> str:
  """00000.tar -> 00000{suffix} in the same folder."""
  base = tar_path[:-len(".tar")] if tar_path.endswith(".tar") else tar_path
  return base + suffix


class WebDatasetSource:
  """Grain random-access source over img2dataset shards; one record per image.

  Args:
    paths: a .tar file, a folder (all *.tar in it), a glob pattern, or a list of those;
      patterns and folders expand in sorted order. gs:// paths need etils.epath + gcsfs (or
      TensorFlow).
    filters: a `MetadataFilter` or its config dict (see `filters.py`), applied now, so
      `len(source)` is the count after filtering; `stats["filtered"]` counts per reason.
      Metadata comes from `{shard}.parquet` (needs pyarrow) or, without one, the .json
      members.
    index_dir: where to cache tar indexes (default: beside the shards, see `load_tar_index`).
    max_open_files: open shard files kept per thread.
    shard_index, shard_count: keep every shard_count-th tar file from shard_index on — host
      sharding at the file level, so that each host indexes and holds only its share (at
      ~70 bytes per sample, a host holding all of LAION-2B would need ~140 GB).
    num_threads: threads that index / filter shards when the source is built.

  A record (raw; decoding and tokenisation come later in the pipeline):
    source: the shard path, key: the sample key (together they name the sample in messages),
    image_bytes: bytes (None if unreadable), image_ext: "jpg" | "png" | ...,
    caption: str | None, metadata: dict | None (the .json member),
    error: None, or a string saying what could not be read.
  """

  def __init__(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], *,
               filters: Union[None, MetadataFilter, Mapping[str, Any]] = None,
               index_dir: Optional[str] = None, max_open_files: int = 32,
               shard_index: int = 0, shard_count: int = 1, num_threads: int = 8):
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    # Host sharding by tar file: each host indexes and holds only its own shards.
    self.shards = fileio.expand_paths(paths, ".tar")[shard_index::shard_count]
    if not self.shards:
      raise ValueError(f"no tar shards for shard_index={shard_index} of {shard_count}")
    self.filter = MetadataFilter.from_config(filters)
    self._reader = fileio.RangeReader(max_open_files)
    self._index_dir = index_dir
    stats: dict[str, Any] = {
        "shards": len(self.shards), "members": 0, "truncated_members": 0,
        "keys_without_image": 0, "samples_before_filtering": 0,
        "filtered": {name: 0 for name in self.filter.active}, "filtered_total": 0,
        "samples_without_metadata": 0, "samples_without_caption": 0,
        "index_built": 0, "index_reused": 0, "index_fallback_dirs": [],
        "unreadable_shards": 0,
    }
    self.unreadable: dict[str, str] = {}  # shard -> why it could not be read
    # Shards are independent and the work is mostly I/O (headers, parquet): threads help,
    # most of all on network storage. Results come back in shard order.
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      prepared = list(pool.map(self._prepare_shard, range(len(self.shards))))
    if len(self.unreadable) == len(self.shards):  # nothing at all to read: not bad data
      path, why = next(iter(self.unreadable.items()))
      raise ValueError(f"no shard is readable ({len(self.shards)} file(s)); {path}: {why}")
    parts, keys = [], []
    for rows, shard_keys, shard_stats in prepared:
      parts.append(rows)
      keys.extend(shard_keys)
      for k, v in shard_stats.items():
        if k == "filtered":
          for reason, n in v.items():
            stats["filtered"][reason] += n
        elif k == "index_fallback_dir":
          if v not in stats["index_fallback_dirs"]:
            stats["index_fallback_dirs"].append(v)
            log.warning("shard folder not writable; tar indexes cached in %s", v)
        elif k == "img2dataset":
          totals = stats.setdefault("img2dataset", {})
          for field, n in v.items():
            totals[field] = totals.get(field, 0) + n
        else:
          stats[k] += v
    self._samples = np.concatenate(parts)
    # Fixed-width bytes: compact, and pickles as one buffer (the source goes to each worker).
    self._keys = np.array([k.encode("utf-8") for k in keys], dtype=bytes)
    stats["filtered_total"] = sum(stats["filtered"].values())
    stats["samples"] = len(self._samples)
    stats["samples_without_caption"] = int((self._samples["text_size"] < 0).sum())
    self.stats = stats

  def _prepare_shard(self, shard_id: int) -> tuple[np.ndarray, list[str], dict]:
    """Index (or reuse the index of) one shard, group and filter its samples. A shard that
    cannot be read at all (permissions, not a tar, gone) holds no samples and is counted in
    `unreadable_shards` / `self.unreadable`: one bad file among thousands is bad data, which
    the mixture's ratio rule judges, not a reason to stop."""
    shard = self.shards[shard_id]
    try:
      index, how, where = load_tar_index(shard, index_dir=self._index_dir)
    except (OSError, ValueError) as e:
      log.warning("%s is unreadable, skipped: %s", shard, e)
      self.unreadable[shard] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
      rows, keys, _ = _samples_of(shard_id, TarIndex(0, 0, [], 0))
      return rows, keys, {"unreadable_shards": 1}
    stats: dict[str, Any] = {f"index_{how}": 1, "members": len(index.members),
                             "truncated_members": index.truncated}
    if where and self._index_dir is None and where != shard + INDEX_SUFFIX:
      stats["index_fallback_dir"] = os.path.dirname(where)
    rows, keys, stats["keys_without_image"] = _samples_of(shard_id, index)
    stats["samples_before_filtering"] = len(rows)
    if self.filter and len(rows):
      keep = self._filter_shard(shard, rows, keys, stats)
      rows = rows[keep]
      keys = [k for k, kept in zip(keys, keep) if kept]
    img2dataset = _read_stats_json(_sibling(shard, "_stats.json"))
    if img2dataset:
      stats["img2dataset"] = img2dataset
    return rows, keys, stats

  def _filter_shard(self, shard: str, rows: np.ndarray, keys: list[str],
                    stats: dict) -> np.ndarray:
    wanted = self.filter.wanted_columns()
    parquet = _sibling(shard, ".parquet")
    n = len(rows)
    if fileio.exists(parquet):
      pq_keys, pq_columns = read_parquet_columns(parquet, wanted)
      row_of = {k: i for i, k in enumerate(pq_keys)}
      # Parquet keys are file stems; tar keys may carry a folder prefix.
      where = np.array([row_of.get(k.rpartition("/")[2], -1) for k in keys], dtype=np.int64)
      found = where >= 0
      columns = {}
      for c, values in pq_columns.items():
        col = np.full(n, np.nan)
        col[found] = values[where[found]]
        columns[c] = col
      stats["samples_without_metadata"] = int((~found).sum())
      source = parquet
    else:  # no parquet: the per-sample .json members
      metas = [self._read_json(shard, r)[0] for r in rows]
      stats["samples_without_metadata"] = sum(m is None for m in metas)
      columns = columns_from_dicts(metas, wanted)
      source = f"{shard} (.json members)"
    keep, stats["filtered"] = self.filter.apply(columns, n, where=f"in {source}")
    return keep

  # ---- reading ---------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self._samples)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} samples")
    row = self._samples[index]
    shard = self.shards[int(row["shard"])]
    record = {"source": shard, "key": self._keys[index].decode("utf-8"),
              "image_ext": IMAGE_EXTS[int(row["image_ext"])], "image_bytes": None,
              "caption": None, "metadata": None, "error": None}
    errors = []
    try:
      record["image_bytes"] = self._reader.read(shard, int(row["image_offset"]),
                                                int(row["image_size"]))
    except OSError as e:
      errors.append(f"cannot read image: {e}")
    if row["text_size"] >= 0:
      try:
        data = self._reader.read(shard, int(row["text_offset"]), int(row["text_size"]))
        record["caption"] = data.decode("utf-8", errors="replace")
      except OSError as e:
        errors.append(f"cannot read caption: {e}")
    metadata, error = self._read_json(shard, row)
    record["metadata"] = metadata
    if error:
      errors.append(error)
    if errors:
      record["error"] = "; ".join(errors)
    return record

  def _read_json(self, shard: str, row) -> tuple[Optional[dict], Optional[str]]:
    if row["json_size"] < 0:
      return None, None
    try:
      data = self._reader.read(shard, int(row["json_offset"]), int(row["json_size"]))
      value = json.loads(data)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError: ValueError
      return None, f"bad metadata json: {e}"
    if not isinstance(value, dict):
      return None, f"metadata json is a {type(value).__name__}, not an object"
    return value, None

  def __repr__(self) -> str:
    # Grain's DataLoader checkpoints record the source's repr: keep it stable and short.
    first = self.shards[0] if self.shards else ""
    return (f"WebDatasetSource(shards={len(self.shards)}, first={first!r}, "
            f"samples={len(self)}, filter={self.filter!r})")


def _samples_of(shard_id: int, index: TarIndex) -> tuple[np.ndarray, list[str], int]:
  """Groups one shard's members into sample rows: (rows, keys, keys without an image)."""
  by_key: dict[str, dict[str, tuple[int, int]]] = {}
  for key, ext, offset, size in index.members:
    by_key.setdefault(key, {})[ext.lower()] = (offset, size)  # a duplicate: the last wins
  rows = np.zeros(len(by_key), _SAMPLE_DTYPE)
  keys, n, no_image = [], 0, 0
  for key, exts in by_key.items():  # dicts keep insertion order: tar order
    image_ext = next((i for i, e in enumerate(IMAGE_EXTS) if e in exts), None)
    if image_ext is None:
      no_image += 1
      continue
    r = rows[n]
    r["shard"], r["image_ext"] = shard_id, image_ext
    r["image_offset"], r["image_size"] = exts[IMAGE_EXTS[image_ext]]
    r["text_offset"], r["text_size"] = exts.get(CAPTION_EXT, (-1, -1))
    r["json_offset"], r["json_size"] = exts.get(METADATA_EXT, (-1, -1))
    keys.append(key)
    n += 1
  return rows[:n], keys, no_image


def _read_stats_json(path: str) -> dict[str, int]:
  """The download counts of an img2dataset {shard}_stats.json ({} when absent/unreadable)."""
  try:
    d = json.loads(fileio.read_bytes(path))
  except (OSError, ValueError, ImportError):
    return {}
  return {k: int(d[k]) for k in _STATS_FIELDS if isinstance(d.get(k), (int, float))}
