"""On-disk cache of tokenised datasets, so a second run with the same data starts at once.

The key is a SHA-256 over everything the tokens depend on: the bytes of the data files, the
tokenizer (its full serialised definition and special tokens), the chat template and the data
settings (format, max_length, column mapping, cleaning, ...), plus :data:`CACHE_VERSION`, which is
bumped whenever the encoding code changes what it produces. One entry is one ``.npz`` file:
all ``input_ids``/``labels`` concatenated as int32 with row offsets (int64), classification
``label`` as int64, and a JSON blob of the counts reported when it was built. Writes go to a
temporary file in the same directory and are renamed into place (``os.replace``), so a crash
never leaves a half-written entry that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger("fastft.data")

CACHE_VERSION = 1


def data_cache_dir() -> Path:
    """``$FASTFT_CACHE/data`` (default ``~/.cache/fastft/data``)."""
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft")) / "data"


def _hash_file(h: "hashlib._Hash", path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def fingerprint_files(paths: Iterable[str]) -> str:
    """Hash of the contents of files (a directory: every file in it, in sorted order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(b"\0path\0" + p.encode())
        p = p.rsplit("::", 1)[0] if "::" in p and not os.path.exists(p) else p  # "<dir>::<split>"
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    h.update(os.path.relpath(full, p).encode())
                    _hash_file(h, full)
        else:
            _hash_file(h, p)
    return h.hexdigest()


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """Hash of a tokenizer's full definition (fast: the serialised Rust tokenizer; slow: the
    vocabulary), its class, special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    h.update(json.dumps(special, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def cache_key(files: Iterable[str], tokenizer: Any, settings: dict) -> str:
    """Cache key of tokenising ``files`` with ``tokenizer`` under ``settings`` (JSON-serialisable)."""
    h = hashlib.sha256(f"fastft-data-v{CACHE_VERSION}".encode())
    h.update(fingerprint_files(files).encode())
    h.update(fingerprint_tokenizer(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def save_examples(path: Path, examples: list[dict], info: dict) -> None:
    """Write ``examples`` (dicts of ``input_ids``, optional ``labels``/``position_ids`` lists, optional
    int ``label``) and ``info`` atomically to ``path`` (.npz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for key in ("input_ids", "labels", "position_ids"):
        if examples and key in examples[0]:
            arrays[key] = np.fromiter((t for e in examples for t in e[key]), dtype=np.int32,
                                      count=int(lengths.sum()))
    if examples and "label" in examples[0]:
        arrays["label"] = np.array([e["label"] for e in examples], dtype=np.int64)
    extra = {k: examples[0][k] for k in ("task",) if examples and k in examples[0]}
    arrays["info"] = np.frombuffer(json.dumps({"info": info, "extra": extra}).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_examples(path: Path) -> tuple[list[dict], dict]:
    """Inverse of :func:`save_examples`: (examples, info)."""
    with np.load(path) as z:
        offsets = z["offsets"]
        meta = json.loads(z["info"].tobytes().decode())
        cols = {k: z[k].tolist() for k in ("input_ids", "labels", "position_ids") if k in z}
        label = z["label"].tolist() if "label" in z else None
    out = []
    for i in range(len(offsets) - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        ex: dict = {k: v[a:b] for k, v in cols.items()}
        if label is not None:
            ex["label"] = label[i]
        ex.update(meta["extra"])
        out.append(ex)
    return out, meta["info"]


def cached(key: str, build: Callable[[], tuple[list[dict], dict]], cache_dir: Path | None = None,
           enabled: bool = True) -> tuple[list[dict], dict, bool]:
    """Return the cached ``(examples, info)`` for ``key``, building and storing them on a miss.

    Returns:
        (examples, info, hit) where ``hit`` tells whether the cache was used.
    """
    if not enabled:
        examples, info = build()
        return examples, info, False
    path = (cache_dir or data_cache_dir()) / f"{key}.npz"
    if path.is_file():
        try:
            examples, info = load_examples(path)
            return examples, info, True
        except Exception as e:  # a corrupt entry (e.g. disk full on an older version): rebuild it
            log.warning("data cache %s unreadable (%s: %s); rebuilding", path, type(e).__name__, e)
    examples, info = build()
    try:
        save_examples(path, examples, info)
    except OSError as e:  # a read-only cache dir must not stop training
        log.warning("could not write data cache %s: %s", path, e)
    return examples, info, False
