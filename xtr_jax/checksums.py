"""File checksums shared by everything that writes or verifies artifacts (export shards, indexes, vocabularies)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str, *, chunk_bytes: int = 1 << 22) -> str:
  """Hex sha256 of a file, read in chunks so multi-GB shards never sit in memory at once."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_bytes), b""):
      h.update(chunk)
  return h.hexdigest()
