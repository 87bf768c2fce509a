"""Compiled trees: the booster turned into native code with lleaves (LLVM), for fast scoring.

Same raw scores as LightGBM (checked on a sample when loaded: max abs difference of the
probabilities must be <= 1e-9), several times the throughput. Compiling a ~700-tree model takes
a minute or more, so the shared object is cached beside the registry (``HOME/compiled/``), keyed
by the booster's text, the lleaves version and the machine, and reused by every later load.
When lleaves is missing, fails, or disagrees with LightGBM, scoring falls back to LightGBM's
own predict with one warning; nothing else changes.

Loading a cached object runs its machine code, so the cache is guarded: the folder is private
to the user (0700, tightened if found looser, and then nothing already in it is trusted), the
SHA-256 of each object is recorded beside it when it is built, and an object is loaded only
from a private copy of bytes that match the record. One that does not match, or has no record,
is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import platform
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

MAX_ABS_DIFF = 1e-9
CHECK_ROWS = 5_000
# The SHA-256 of a cached object, beside it: "KEY.so" -> "KEY.so.sha256".
RECORD_SUFFIX = ".sha256"
_locks: dict[str, threading.Lock] = {}
log = logging.getLogger(__name__)


class CompiledTreesUnavailable(UserWarning):
    """Scoring uses LightGBM because compiled trees could not be built or did not match."""


def cache_key(model_text: str) -> str:
    """The cached object's name for a booster (its text as ``model_to_string`` gives it)."""
    try:
        version = metadata.version("lleaves")
    except metadata.PackageNotFoundError:
        version = "none"
    digest = hashlib.sha256(model_text.encode()).hexdigest()[:20]
    return f"{digest}-lleaves{version}-{platform.machine()}"


def private_folder(folder: Path) -> None:
    """Make ``folder`` (the cache) private to this user: created 0700, tightened to 0700 when
    found looser. Others could write in a looser folder, so then every record in it is dropped
    and each object rebuilt before it is loaded. A folder of another user is refused."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user (uid {info.st_uid})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        folder.chmod(0o700)
        dropped = list(folder.glob(f"*{RECORD_SUFFIX}"))
        for record in dropped:
            record.unlink(missing_ok=True)
        log.warning(
            f"{folder} was open to other users (mode {stat.S_IMODE(info.st_mode):o}): made it "
            f"private (700); its {len(dropped)} compiled model(s) will be rebuilt, not loaded"
        )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified_object(target: Path) -> bytes | None:
    """The cached object's bytes if they match the SHA-256 recorded when it was built; None
    when there is none, or no record, or a mismatch (then it is rebuilt, never loaded)."""
    record = target.with_name(target.name + RECORD_SUFFIX)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return None
    try:
        recorded = record.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        log.warning(f"{target.name}: compiled model without a recorded SHA-256; rebuilding it")
        return None
    if not hmac.compare_digest(_digest(data), recorded):
        log.warning(
            f"{target.name}: compiled model does not match the SHA-256 recorded when it was "
            "built; rebuilding it, not loading it"
        )
        return None
    return data


def _build(model: Any, cache_dir: Path, key: str, target: Path) -> None:
    """Compile ``model``, which keeps the code it compiled, and cache the object and its
    SHA-256 (each written to a private name, then renamed: a reader never sees half)."""
    pid = os.getpid()
    partial = cache_dir / f".{key}.{pid}.tmp.so"
    # lleaves loads, unchecked, whatever already sits at the cache path it is given: a file a
    # crashed process of the same pid left there must go first.
    partial.unlink(missing_ok=True)
    model.compile(cache=str(partial), raw_score=True)
    digest = _digest(partial.read_bytes())
    os.replace(partial, target)
    record = cache_dir / f".{key}.{pid}.tmp{RECORD_SUFFIX}"
    record.write_text(digest + "\n", encoding="ascii")
    os.replace(record, target.with_name(target.name + RECORD_SUFFIX))


class CompiledTrees:
    """Raw scores from the compiled model; ``predict_raw`` matches ``Booster.predict(raw)``."""

    def __init__(self, model: Any, path: Path, n_jobs: int) -> None:
        self._model = model
        self.path = path
        self.n_jobs = n_jobs

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        # One thread for small inputs: thread start-up costs more than a few rows take.
        jobs = 1 if len(X) < 10_000 else self.n_jobs
        return np.asarray(self._model.predict(np.ascontiguousarray(X, dtype=np.float64), jobs))


def compile_booster(
    booster: Any,
    cache_dir: Path,
    check_rows: np.ndarray | None,
    to_probability: Callable[[np.ndarray], np.ndarray],
    n_jobs: int = 0,
) -> CompiledTrees | None:
    """Compiled trees for ``booster`` (from the cache when present), or None with a warning.

    ``to_probability`` maps raw scores to the probabilities the product reports (calibration
    included); the check compares those, on ``check_rows``.
    """
    started = time.perf_counter()
    try:
        import lleaves

        text = booster.model_to_string()
        key = cache_key(text)
        private_folder(cache_dir)
        target = cache_dir / f"{key}.so"
        lock = _locks.setdefault(key, threading.Lock())
        with lock, tempfile.TemporaryDirectory(prefix="backorder-lleaves-") as tmp:
            model_file = Path(tmp) / "model.txt"
            model_file.write_text(text, encoding="utf-8")
            model = lleaves.Model(model_file=str(model_file))
            cached = verified_object(target)
            fresh = cached is None
            if cached is not None:
                # Loaded from a copy in this process's private folder, of the bytes just
                # checked: the cached file may change after the check, the copy cannot.
                copy = Path(tmp) / "compiled.so"
                copy.write_bytes(cached)
                model.compile(cache=str(copy), raw_score=True)
            else:
                log.info(f"compiling {booster.num_trees()} trees (once; cached in {cache_dir})")
                _build(model, cache_dir, key, target)
        compiled = CompiledTrees(model, target, n_jobs or os.cpu_count() or 1)
    except Exception as exc:
        warnings.warn(
            f"compiled trees unavailable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "scoring with LightGBM",
            CompiledTreesUnavailable,
            stacklevel=2,
        )
        return None
    if check_rows is not None and len(check_rows):
        sample = np.ascontiguousarray(check_rows[:CHECK_ROWS], dtype=np.float64)
        expected = to_probability(np.asarray(booster.predict(sample, raw_score=True)))
        got = to_probability(compiled.predict_raw(sample))
        diff = float(np.max(np.abs(expected - got)))
        if not diff <= MAX_ABS_DIFF:
            warnings.warn(
                f"compiled trees differ from LightGBM by {diff:.3g} (> {MAX_ABS_DIFF:g}) on "
                f"{len(sample):,} rows; scoring with LightGBM",
                CompiledTreesUnavailable,
                stacklevel=2,
            )
            return None
    if fresh:
        log.info(f"compiled trees ready in {time.perf_counter() - started:.1f} s")
    return compiled
