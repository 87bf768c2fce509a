"""Trust the registry (issue 15): promotions and rollbacks that cannot race, a training run that
promotes only over the champion it was compared with, and model files that are what was
registered, down to the compiled trees' cache."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest

import backorder
from backorder.compiled import RECORD_SUFFIX, cache_key
from backorder.config import Settings
from backorder.data import load_rows
from backorder.errors import ModelNotFoundError, StateStoreError
from backorder.mlflow_model import ARTIFACT_HASHES, as_model_input
from backorder.model import BOOSTER_FILE, MODEL_FILE
from backorder.pipelines import promote_or_keep
from backorder.registry import REFERENCE_FILE, Registry, RunRecord
from backorder.state import StateStore
from backorder.train import run_training
from tests.conftest import ROOT, SAMPLE, make_settings, run_cli
from tests.support.keys import bearer, make_key
from tests.support.servers import PostgresServer, serving, wait_until
from tests.test_cli import one_line_error
from tests.test_state import _fresh_postgres_database

SRC = str(Path(backorder.__file__).parents[1])  # this package, for the other processes


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    """`code` in a separate Python process importing this checkout's package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


def _more_versions(registry: Registry, count: int) -> list[str]:
    """New versions of the registered model, each another registration of v1's files (as if
    other runs had registered them): promotions need versions, not new training."""
    first = registry.client.get_model_version(registry.name, "1")
    return [
        str(
            registry.client.create_model_version(
                registry.name,
                source=first.source,
                run_id=first.run_id,
                tags=dict(first.tags),
                model_id=first.model_id,
            ).version
        )
        for _ in range(count)
    ]


def _history(registry: Registry) -> list[str]:
    tags = registry.client.get_registered_model(registry.name).tags
    return list(json.loads(tags.get("champion_history", "[]")))


# -- the lock ----------------------------------------------------------------------------------
LOCK_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=LOCK_BACKENDS)
def lock_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return _fresh_postgres_database(server)


HOLDER = """
    import os, sys, time
    from pathlib import Path
    from backorder.state import StateStore

    url, log = sys.argv[1], Path(sys.argv[2])
    store = StateStore(url)
    for _ in range(5):
        with store.lock("promotion:test"):
            with log.open("a") as f:
                f.write(f"in {os.getpid()}\\n")
            time.sleep(0.02)  # a window for another holder to (wrongly) come in
            with log.open("a") as f:
                f.write(f"out {os.getpid()}\\n")
"""


def test_a_named_lock_excludes_other_processes(lock_url: str, tmp_path: Path) -> None:
    StateStore(lock_url).migrate()
    log = tmp_path / "held.log"
    holders = [_python(HOLDER, lock_url, str(log)) for _ in range(3)]
    for holder in holders:
        _finish(holder, timeout=120)
    lines = log.read_text().splitlines()
    assert len(lines) == 3 * 5 * 2
    # Every "in" is followed by the same process's "out": never two holders at once.
    for entered, left in zip(lines[::2], lines[1::2], strict=True):
        assert entered.startswith("in ") and left == "out " + entered.removeprefix("in ")


def test_a_lock_held_elsewhere_makes_a_clear_error_and_dies_with_its_holder(
    lock_url: str,
) -> None:
    store = StateStore(lock_url)
    store.migrate()
    holder = _python(
        """
        import sys, time
        from backorder.state import StateStore
        with StateStore(sys.argv[1]).lock("promotion:test"):
            print("held", flush=True)
            time.sleep(600)
        """,
        lock_url,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateStoreError) as refused, store.lock("promotion:test", 0.3):
            pass
        message = str(refused.value)
        assert "lock 'promotion:test' is still held" in message and "\n" not in message
        other = store.lock("promotion:other", 5)  # another name is another lock
        with other:
            pass
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the lock goes with it
        holder.wait(timeout=30)
        with store.lock("promotion:test", 30):
            pass
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
        store.dispose()


# -- promotions from many processes at once ----------------------------------------------------
WORKER = """
    import json, random, sys, time
    from pathlib import Path
    from backorder.config import load_settings
    from backorder.errors import ModelNotFoundError
    from backorder.registry import Registry

    home, seed, start = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    versions = sys.argv[4].split(",")
    registry = Registry(load_settings(None, home=home))
    rng = random.Random(seed)
    Path(f"{start}.ready{seed}").touch()
    while not Path(start).exists():
        time.sleep(0.01)
    done = []
    while versions:
        if rng.random() < 0.6:
            version = versions.pop()
            registry.promote(version)
            done.append(["promote", version])
        else:
            try:
                done.append(["rollback", *registry.rollback()])
            except ModelNotFoundError:
                done.append(["rollback", None, None])
    print(json.dumps(done))
"""
WORKERS = 3
PROMOTIONS_EACH = 10


def _cli(*args: str, home: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")}
    env["BACKORDER_HOME"] = str(home)
    exe = Path(sys.executable).with_name("backorder")
    return subprocess.Popen(
        [str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _cli_moves(runs: list[subprocess.Popen[str]]) -> Counter[str]:
    """What each `models promote/rollback` process says it did."""
    moves: Counter[str] = Counter()
    for run in runs:
        out, err = run.communicate(timeout=600)
        if run.returncode == 3 and "no earlier champion" in err:
            continue
        assert run.returncode == 0, err
        if out.startswith("champion is now v"):
            moves["promoted"] += 1
        else:
            assert out.startswith("champion rolled back from v"), out
            moves["rolled back"] += 1
    return moves


def test_concurrent_promotions_and_rollbacks_keep_champion_history_and_list_in_agreement(
    trained_settings: Settings, tmp_path: Path
) -> None:
    """Processes promote and roll back at once. Each promotion is of a version never promoted
    before, so each must add one entry to the history, and each rollback take one away."""
    registry = Registry(trained_settings)
    home = trained_settings.home
    fresh = _more_versions(registry, WORKERS * PROMOTIONS_EACH + 1)
    by_cli, fresh = fresh[0], fresh[1:]
    before = _history(registry)
    start = tmp_path / "start"
    # The commands start as the workers do (and take as long to import), so that they act
    # about when the workers are let go.
    cli = [_cli("models", "promote", by_cli, home=home), _cli("models", "rollback", home=home)]
    workers = [
        _python(WORKER, str(home), str(seed), str(start), ",".join(fresh[seed::WORKERS]))
        for seed in range(WORKERS)
    ]

    def ready() -> None:
        waiting = [n for n in range(WORKERS) if not Path(f"{start}.ready{n}").exists()]
        assert not waiting, f"workers {waiting} not ready"

    wait_until(ready, "workers ready", 300)
    start.touch()
    done = [json.loads(_finish(worker)[0]) for worker in workers]
    moves = _cli_moves(cli)

    history = _history(registry)
    champion = registry.champion_version()
    # The alias and its history agree...
    assert champion is not None and history and history[-1] == champion, (champion, history)
    # ...and so does what `models list --json` prints: one champion, the history's last.
    marked = [row["version"] for row in registry.versions() if "champion" in row["aliases"]]
    assert marked == [champion]
    # No update was lost: every promotion added one entry, every rollback took one away.
    ops = [op for worker in done for op in worker]
    promoted = sum(op[0] == "promote" for op in ops) + moves["promoted"]
    rolled_back = sum(op[0] == "rollback" and op[1] is not None for op in ops)
    rolled_back += moves["rolled back"]
    assert moves["promoted"] == 1 and rolled_back  # both kinds really ran
    assert len(history) == len(before) + promoted - rolled_back, (history, promoted, rolled_back)
    assert all(a != b for a, b in itertools.pairwise(history))


def test_an_alias_moved_without_its_history_is_put_in_the_history_first(
    trained_settings: Settings,
) -> None:
    """A process that died between moving the alias and writing the history (or an alias
    moved by hand in MLflow's UI) leaves them apart; the next rollback goes by the alias."""
    registry = Registry(trained_settings)
    second, third = _more_versions(registry, 2)
    registry.promote(second)
    registry.client.set_registered_model_alias(registry.name, "champion", third)
    assert _history(registry) == ["1", second]  # apart: the alias says v3
    rolled = run_cli("models", "rollback", home=trained_settings.home)
    assert rolled.returncode == 0, rolled.stderr
    assert f"champion rolled back from v{third} to v{second}" in rolled.stdout
    assert registry.champion_version() == second and _history(registry) == ["1", second]


# -- a decision made against a champion that has since changed ---------------------------------
def test_a_training_run_never_promotes_over_a_champion_it_was_not_compared_with(
    trained_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = trained_settings.home
    registry = Registry(trained_settings)
    # A weak champion (v2), so that the next run's model clearly beats it.
    weak = make_settings(
        home,
        lightgbm={
            "num_leaves": 2,
            "max_trees": 3,
            "learning_rate": 0.01,
            "early_stopping_rounds": 1,
        },
    )
    run_training([SAMPLE / "labelled.csv.gz"], weak, tmp_path / "weak")
    registry.promote("2")
    assert registry.champion_version() == "2"

    # While the next run is being registered (it compared itself with v2 and won), a planner
    # in another process makes v1 champion again.
    import backorder.train as train_module

    log_run = train_module._log_run

    def registered_while_the_champion_moves(*args: Any, **kwargs: Any) -> tuple[str, str]:
        registered = log_run(*args, **kwargs)
        moved = run_cli("models", "promote", "1", home=home)
        assert moved.returncode == 0 and "champion is now v1" in moved.stdout, moved.stderr
        return registered

    monkeypatch.setattr(train_module, "_log_run", registered_while_the_champion_moves)
    outcome = run_training([SAMPLE / "labelled.csv.gz"], trained_settings, tmp_path / "late")

    assert outcome.version == "3" and not outcome.promoted
    assert registry.champion_version() == "1"
    assert _history(registry) == ["1", "2", "1"]
    assert registry.resolve("challenger") == "3"
    reason = outcome.decision.reason
    assert reason.startswith("not promoted: champion is now v1; v3 was compared with v2 (beats")
    assert "backorder models promote 3" in reason and "\n" not in reason
    # Every record of the run says the same.
    metrics = json.loads(outcome.metrics_file.read_text())
    assert metrics["promotion"]["promoted"] is False and metrics["promotion"]["reason"] == reason
    assert "not promoted: champion is now v1" in outcome.report.read_text()
    mv = registry.client.get_model_version(registry.name, "3")
    assert mv.tags["promotion"] == reason
    assert registry.client.get_run(outcome.run_id).data.tags["promotion"] == reason


def test_the_pipelines_promote_step_refuses_a_stale_decision(trained_settings: Settings) -> None:
    registry = Registry(trained_settings)
    challenger, newer = _more_versions(registry, 2)
    registry.promote(newer)  # v3 became champion after v2 was compared with v1
    assert registry.champion_version() == newer
    trained = {
        "version": challenger,
        "should_promote": True,
        "reason": "beats champion v1: average precision +0.0100",
        "compared_with": "1",
    }
    decided = promote_or_keep(trained_settings, trained)
    assert decided["promoted"] is False and decided["champion"] == newer
    assert decided["reason"].startswith("not promoted: champion is now v3; v2 was compared with v1")
    assert registry.champion_version() == newer
    # A first model decided on an empty registry does not replace a champion that came since.
    first = registry.promote(challenger, compared_with=None)
    assert not first.promoted and first.reason == "champion is now v3; v2 was compared with none"
    # The decision is applied when the champion is still the one it was compared with.
    decided = promote_or_keep(trained_settings, trained | {"compared_with": newer})
    assert decided["promoted"] is True and registry.champion_version() == challenger
    assert _history(registry) == ["1", newer, challenger]


# -- model files that are what was registered -------------------------------------------------
@pytest.fixture
def own_artifacts(trained_settings: Settings) -> Settings:
    """The trained registry, logging new runs to an experiment whose artifacts are in this
    test's home (the session's files are shared by every test: never change those)."""
    return trained_settings.model_copy(update={"experiment_name": "integrity"})


def _register_copy_of_v1(settings: Settings) -> str:
    """A new version with v1's pipeline and reference in files of its own (no training)."""
    registry = Registry(settings)
    v1 = registry.load("1", with_reference=True)
    _, version = registry.log_training_run(
        v1.pipeline, RunRecord(dict(v1.metadata), reference=v1.reference)
    )
    return version


def _stored_file(settings: Settings, version: str, name: str) -> Path:
    registry = Registry(settings)
    model_id = registry.client.get_model_version(registry.name, version).source.removeprefix(
        "models:/"
    )
    [path] = (settings.home / "mlartifacts").rglob(f"{model_id}/**/{name}")
    return path


def _change_one_byte_of_a_leaf(booster: Path) -> None:
    """One digit of one leaf value, another digit: still a booster LightGBM reads."""
    text = booster.read_bytes()
    at = text.index(b"leaf_value=") + len(b"leaf_value=")
    while not chr(text[at]).isdigit():
        at += 1
    changed = b"7" if text[at : at + 1] != b"7" else b"3"
    booster.write_bytes(text[:at] + changed + text[at + 1 :])


def test_a_registered_booster_changed_by_one_byte_is_refused_everywhere(
    own_artifacts: Settings, tmp_path: Path
) -> None:
    settings = own_artifacts
    version = _register_copy_of_v1(settings)
    registry = Registry(settings)
    recorded = json.loads(
        registry.client.get_model_version(registry.name, version).tags[ARTIFACT_HASHES]
    )
    assert set(recorded) == {BOOSTER_FILE, MODEL_FILE, REFERENCE_FILE}
    assert registry.load(version).version == version  # intact: it loads

    _change_one_byte_of_a_leaf(_stored_file(settings, version, BOOSTER_FILE))
    with pytest.raises(ModelNotFoundError) as refused:
        registry.load(version)
    message = str(refused.value)
    assert type(refused.value).__name__ == "ArtifactIntegrityError"
    assert message.startswith(f"model version {version} of 'backorder': {BOOSTER_FILE} does not")
    assert "recorded at registration" in message and "\n" not in message
    with pytest.raises(ModelNotFoundError, match=BOOSTER_FILE):
        registry.load_for_scoring(version)

    # The command line: one line, exit 3, nothing written.
    result = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "p.parquet"),
        "--model",
        version,
        home=settings.home,
    )
    assert result.returncode == 3
    error = one_line_error(result.stderr)
    assert error.startswith(f"error: model version {version} of 'backorder': {BOOSTER_FILE} does")
    assert BOOSTER_FILE in result.stderr and not (tmp_path / "p.parquet").exists()

    # MLflow's own loader (pyfunc, and so Spark) checks the files too.
    rows, _, _ = load_rows(SAMPLE / "new_batch.csv.gz", 8 << 20)
    with pytest.raises(ModelNotFoundError, match=f"{BOOSTER_FILE} does not match"):
        mlflow.pyfunc.load_model(f"models:/backorder/{version}").predict(as_model_input(rows))
    # The untouched versions still load, by both loaders.
    assert registry.load("1").version == "1"
    assert len(mlflow.pyfunc.load_model("models:/backorder/1").predict(as_model_input(rows))) > 0


@pytest.mark.parametrize("name", [MODEL_FILE, REFERENCE_FILE])
def test_a_changed_model_json_or_reference_is_refused(own_artifacts: Settings, name: str) -> None:
    version = _register_copy_of_v1(own_artifacts)
    stored = _stored_file(own_artifacts, version, name)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    registry = Registry(own_artifacts)
    with pytest.raises(ModelNotFoundError, match=f"{name} does not match the SHA-256"):
        registry.load(version, with_reference=True)
    if name == REFERENCE_FILE:  # drift and compiled trees read it; plain scoring does not
        with pytest.raises(ModelNotFoundError, match=name):
            registry.load(version, compiled=True)
    stored.unlink()
    with pytest.raises(ModelNotFoundError, match=f"{name} is missing"):
        registry.load(version, with_reference=True)


def test_versions_registered_before_hashes_still_load_with_one_warning(
    own_artifacts: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    version = _register_copy_of_v1(own_artifacts)
    registry = Registry(own_artifacts)
    registry.client.delete_model_version_tag(registry.name, version, ARTIFACT_HASHES)
    with caplog.at_level(logging.WARNING, logger="backorder"):
        first = registry.load(version, with_reference=True)
        again = registry.load(version)
    assert first.reference is not None and again.version == version
    warned = [m for m in caplog.messages if "before artifact hashes were recorded" in m]
    assert len(warned) == 1 and f"model version {version} " in warned[0]
    # Hashes that cannot be read are not "no hashes": refused.
    registry.client.set_model_version_tag(registry.name, version, ARTIFACT_HASHES, "not json")
    with pytest.raises(ModelNotFoundError, match=r"recorded artifact hashes .* are unreadable"):
        registry.load(version)


def _metric(text: str, name: str) -> float:
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def test_the_server_keeps_its_model_when_the_new_champion_was_changed(
    own_artifacts: Settings, tmp_path: Path
) -> None:
    home = own_artifacts.home
    token = make_key(own_artifacts, "admin")
    tampered = _register_copy_of_v1(own_artifacts)
    _change_one_byte_of_a_leaf(_stored_file(own_artifacts, tampered, BOOSTER_FILE))
    env = {
        "BACKORDER_SERVE_RELOAD_SECONDS": "0.2",
        "BACKORDER_COMPILED_TREES": "false",
        "BACKORDER_EXPERIMENT_NAME": "integrity",
    }
    log = tmp_path / "serve.log"
    with (
        serving(home, log, env=env) as url,
        httpx.Client(base_url=url, headers=bearer(token)) as client,
    ):
        assert client.get("/v1/model").json()["version"] == "1"
        promoted = run_cli("models", "promote", tampered, home=home)
        assert promoted.returncode == 0, promoted.stderr

        def failed_reload() -> None:
            failures = _metric(client.get("/metrics").text, "backorder_model_reload_failures_total")
            assert failures >= 1

        wait_until(failed_reload, "a counted reload failure", 60)
        assert client.get("/v1/model").json()["version"] == "1"
        answer = client.post("/v1/predict", json={"records": [_typical_record()]})
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    [refused] = {
        line["reason"]
        for line in map(json.loads, filter(str.strip, log.read_text().splitlines()))
        if line["message"].startswith("model reload failed")
    }
    assert refused.startswith(f"model version {tampered} of 'backorder': {BOOSTER_FILE} does not")


def _typical_record() -> dict[str, Any]:
    from backorder.web import FORM_DEFAULTS

    return dict(FORM_DEFAULTS)


# -- the compiled trees' cache ------------------------------------------------------------------
def _flip_a_constant(compiled: Path) -> None:
    """One byte of one of the object's double constants (split thresholds, leaf values): still
    code that loads and runs, only with another number in it."""
    data = bytearray(compiled.read_bytes())
    assert data[:4] == b"\x7fELF" and data[4] == 2  # a 64-bit ELF object
    shoff, shentsize, shnum, shstrndx = (
        struct.unpack_from("<Q", data, 0x28)[0],
        *struct.unpack_from("<HHH", data, 0x3A),
    )

    def section(index: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + index * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        label = bytes(data[names_at + name : data.index(0, names_at + name)])
        if label.startswith(b".rodata") and size >= 8:
            data[offset + 5] ^= 0x01
            compiled.write_bytes(bytes(data))
            return
    raise AssertionError(f"{compiled}: no constants section")


@pytest.fixture
def fresh_cache(trained_settings: Settings) -> Iterator[Path]:
    cache = trained_settings.home / "compiled"
    shutil.rmtree(cache, ignore_errors=True)
    yield cache


def _compiling(caplog: pytest.LogCaptureFixture) -> bool:
    return any(m.startswith("compiling") for m in caplog.messages)


def test_a_changed_compiled_object_is_rebuilt_not_loaded(
    trained_settings: Settings, fresh_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(trained_settings)
    rows, _, _ = load_rows(SAMPLE / "new_batch.csv.gz", 8 << 20)
    expected = registry.load("champion").probability(rows)
    with caplog.at_level(logging.INFO, logger="backorder.compiled"):
        assert registry.load("champion", compiled=True).scoring_engine == "compiled"
    assert _compiling(caplog)
    assert stat.S_IMODE(fresh_cache.stat().st_mode) == 0o700
    [cached] = fresh_cache.glob("*.so")
    record = cached.with_name(cached.name + RECORD_SUFFIX)
    built = cached.read_bytes()
    assert record.read_text().strip() == _sha256(built)

    _flip_a_constant(cached)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backorder.compiled"):
        model = registry.load("champion", compiled=True)
    assert _compiling(caplog)  # rebuilt...
    assert any("does not match the SHA-256" in m for m in caplog.messages)
    assert model.scoring_engine == "compiled"
    assert record.read_text().strip() == _sha256(cached.read_bytes())  # ...and recorded again
    assert np.max(np.abs(model.probability(rows) - expected)) <= 1e-9


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


PLANTED = r"""
#include <stdio.h>
/* lleaves' entry point: whoever loads this object runs it on the first prediction. */
void forest_root(double *data, double *out, int start, int end) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("ran\n", f); fclose(f); }
    for (int i = start; i < end; i++) out[i] = 0.0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the planted object")
def test_an_object_planted_in_a_cache_that_was_open_to_others_never_runs(
    trained_settings: Settings, fresh_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Someone who could write in the cache (it was world-writable) planted an object under the
    # champion's name, and a record that matches it.
    registry = Registry(trained_settings)
    champion = registry.load("champion")
    key = cache_key(champion.classifier.booster_.model_to_string())
    marker = tmp_path / "planted-code-ran"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    fresh_cache.mkdir()
    fresh_cache.chmod(0o777)
    planted = fresh_cache / f"{key}.so"
    subprocess.run(
        ["cc", "-c", "-fPIC", "-O1", f'-DMARKER="{marker}"', str(source), "-o", str(planted)],
        check=True,
    )
    planted.with_name(planted.name + RECORD_SUFFIX).write_text(_sha256(planted.read_bytes()))
    # And where this process would compile to, as if a crashed process of the same id left it.
    shutil.copy(planted, fresh_cache / f".{key}.{os.getpid()}.tmp.so")

    with caplog.at_level(logging.INFO, logger="backorder.compiled"):
        model = registry.load("champion", compiled=True)
    assert not marker.exists()  # its code never ran
    assert stat.S_IMODE(fresh_cache.stat().st_mode) == 0o700
    assert any("made it private (700)" in m for m in caplog.messages)
    assert _compiling(caplog) and model.scoring_engine == "compiled"
    rows, _, _ = load_rows(SAMPLE / "new_batch.csv.gz", 8 << 20)
    assert np.max(np.abs(model.probability(rows) - champion.probability(rows))) <= 1e-9
    assert not marker.exists()
