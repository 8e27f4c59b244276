"""File digests, shared by checkpoints and deployed bundles (torch-free)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["sha256_file", "sha256_json"]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: object) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON (sorted keys, no spaces): equal content, equal digest."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
