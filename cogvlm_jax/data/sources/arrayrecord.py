"""ArrayRecord files of raw records: a random-access copy of a source that has none.

Grain's global shuffle and exact resume need random access. Tar shards get a member index
(`webdataset.py`), JSON sources are held in memory; a source that can only be streamed (a
generator, a remote stream, a format without an index) is written once to ArrayRecord with
`write_arrayrecord` and read back with `ArrayRecordSource` (Grain's ArrayRecordDataSource).

A record is stored as: 4-byte little-endian length of a JSON header, the header (every field
that is not bytes, plus the names and sizes of the bytes fields), then the bytes fields
(e.g. "image_bytes") back to back. No pickle: reading a file never runs code from it.

    python -m cogvlm_jax.data.sources.arrayrecord --webdataset 'shards/*.tar' --out data/laion
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Iterable, Optional

from cogvlm_jax import fileio

SUFFIX = ".array_record"


def encode_record(record: dict) -> bytes:
  """A raw record (str/number/list/dict/None fields and bytes fields) -> one blob."""
  header: dict[str, Any] = {"fields": {}, "blobs": []}
  blobs = []
  for key, value in record.items():
    if isinstance(value, (bytes, bytearray, memoryview)):
      header["blobs"].append([key, len(value)])
      blobs.append(bytes(value))
    else:
      header["fields"][key] = value
  head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_record(blob: bytes) -> dict:
  """The inverse of `encode_record`; ValueError for a malformed blob."""
  if len(blob) < 4:
    raise ValueError("record shorter than its header length")
  (n,) = struct.unpack_from("<I", blob)
  header = json.loads(blob[4:4 + n])
  record = dict(header["fields"])
  offset = 4 + n
  for key, size in header["blobs"]:
    if offset + size > len(blob):
      raise ValueError(f"record truncated in field {key!r}")
    record[key] = blob[offset:offset + size]
    offset += size
  return record


def write_arrayrecord(records: Iterable[dict], out_prefix: str, *,
                      records_per_file: int = 10_000, progress: bool = False) -> list[str]:
  """Writes `records` to `{out_prefix}-00000-of-NNNNN.array_record` files; returns the paths.

  Each file is written under a temporary name and renamed into place when complete, and
  the final names (with the file count) are given only once all are written: an
  interrupted conversion leaves no file that looks complete.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  if records_per_file <= 0:
    raise ValueError(f"records_per_file must be positive, got {records_per_file}")
  if fileio.is_remote(out_prefix):  # the ArrayRecord writer only writes local files
    raise ValueError(f"write_arrayrecord writes local files; write to a local prefix and "
                     f"copy the files to {out_prefix!r} afterwards")
  folder = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(folder, exist_ok=True)
  base = os.path.basename(out_prefix)
  # Files of an earlier conversion to this prefix would be read together with the new ones.
  old = glob.glob(f"{glob.escape(out_prefix)}-*-of-*{SUFFIX}")
  if old:
    raise FileExistsError(f"{len(old)} ArrayRecord file(s) already at {out_prefix}-*, e.g. "
                          f"{old[0]}; remove them or choose another prefix")
  parts: list[str] = []
  writer: Optional[ArrayRecordWriter] = None
  count = 0

  def close():
    if writer is not None:
      writer.close()

  try:
    for record in records:
      if count % records_per_file == 0:
        close()
        # Hidden while incomplete: a killed conversion leaves nothing a glob would pick up.
        parts.append(os.path.join(folder, f".{base}.part{len(parts):05d}.tmp"))
        writer = ArrayRecordWriter(parts[-1], "group_size:1")
      writer.write(encode_record(record))
      count += 1
      if progress and count % 1000 == 0:
        print(f"\r{count:,} records", end="", flush=True)
    close()
    writer = None
  except BaseException:
    close()
    for p in parts:
      if os.path.exists(p):
        os.remove(p)
    raise
  final = [f"{out_prefix}-{i:05d}-of-{len(parts):05d}{SUFFIX}" for i in range(len(parts))]
  for tmp, path in zip(parts, final):
    os.replace(tmp, path)
  if progress:
    print(f"\r{count:,} records in {len(final)} file(s) at {out_prefix}*", flush=True)
  return final


class ArrayRecordSource:
  """Grain random-access source over files written by `write_arrayrecord`.

  paths: files, folders (every *.array_record) or globs. A record that cannot be decoded
  comes back with `error` set (the pipeline counts it as a bad sample) instead of raising.
  """

  def __init__(self, paths):
    import grain

    self.paths = fileio.expand_paths(paths, SUFFIX)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    blob = self._source[int(index)]
    try:
      return decode_record(blob)
    except (ValueError, KeyError, TypeError) as e:
      return {"source": f"{len(self.paths)} ArrayRecord file(s) from {self.paths[0]}",
              "key": str(index), "image_bytes": None,
              "error": f"undecodable ArrayRecord record {index}: {e}"}

  def __repr__(self) -> str:
    return f"ArrayRecordSource(files={len(self.paths)}, records={len(self)})"


def _main(argv=None) -> None:
  import argparse

  from cogvlm_jax.data.sources.webdataset import WebDatasetSource

  p = argparse.ArgumentParser(description="Copy a source into ArrayRecord files.")
  p.add_argument("--webdataset", required=True, help="tar shards: a file, folder or glob")
  p.add_argument("--out", required=True, help="output prefix, e.g. data/laion")
  p.add_argument("--records_per_file", type=int, default=10_000)
  args = p.parse_args(argv)
  source = WebDatasetSource(args.webdataset)
  write_arrayrecord((source[i] for i in range(len(source))), args.out,
                    records_per_file=args.records_per_file, progress=True)


if __name__ == "__main__":
  _main()
