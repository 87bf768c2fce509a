"""Compiled trees: the booster turned into native code with lleaves (LLVM), for fast scoring.

Same raw scores as LightGBM (checked on a sample when loaded: max abs difference of the
probabilities must be <= 1e-9), several times the throughput. Compiling a ~700-tree model takes
a minute or more, so the shared object is cached beside the registry (``HOME/compiled/``), keyed
by the booster's text, the lleaves version and the machine, and reused by every later load.
When lleaves is missing, fails, or disagrees with LightGBM, scoring falls back to LightGBM's
own predict with one warning; nothing else changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
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
_locks: dict[str, threading.Lock] = {}
log = logging.getLogger(__name__)


class CompiledTreesUnavailable(UserWarning):
    """Scoring uses LightGBM because compiled trees could not be built or did not match."""


def _cache_key(model_text: str) -> str:
    try:
        version = metadata.version("lleaves")
    except metadata.PackageNotFoundError:
        version = "none"
    digest = hashlib.sha256(model_text.encode()).hexdigest()[:20]
    return f"{digest}-lleaves{version}-{platform.machine()}"


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
        key = _cache_key(text)
        cache_dir.mkdir(parents=True, exist_ok=True)
        target = cache_dir / f"{key}.so"
        lock = _locks.setdefault(key, threading.Lock())
        with lock, tempfile.TemporaryDirectory(prefix="backorder-lleaves-") as tmp:
            model_file = Path(tmp) / "model.txt"
            model_file.write_text(text, encoding="utf-8")
            model = lleaves.Model(model_file=str(model_file))
            fresh = not target.is_file()
            if not fresh:
                model.compile(cache=str(target), raw_score=True)
            else:
                log.info(f"compiling {booster.num_trees()} trees (once; cached in {cache_dir})")
                # Compile to a private name, then rename: a concurrent reader never sees half.
                partial = cache_dir / f".{key}.{os.getpid()}.tmp.so"
                model.compile(cache=str(partial), raw_score=True)
                os.replace(partial, target)
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
