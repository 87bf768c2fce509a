"""One writer per batch, and ids that do not collide (issue 15).

Batch ids are unique and sort by time; a land creates its file exclusively; a batch's lease on
the landing root lets one runner score it; a run killed with SIGKILL in the middle of a batch
leaves nothing a reader can see, for every kind of output, and a re-run gives the whole batch.
Every server is real (tests/support/servers.py); the killed runs are the real command line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core
import pandas as pd
import pytest
import sqlalchemy as sa

from backorder.catalog import (
    SCORING,
    UNSCORED,
    BatchTaken,
    Landing,
    batch_id_of,
    batch_time,
)
from backorder.config import Settings
from backorder.databases import sqlalchemy_url
from backorder.errors import InputFileError
from backorder.predict import new_batch_id, predict_file
from backorder.registry import Registry
from tests.conftest import ROOT, SAMPLE, make_settings
from tests.support.servers import SeaweedS3

OLD_ID = "20261102T000000Z"


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def cli_process(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The real `backorder` command, started and not waited for (run_cli's environment)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")}
    full_env.update({"BACKORDER_HOME": str(home), **(env or {})})
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("backorder")), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
    )


# -- batch ids ------------------------------------------------------------------------------------
def test_default_batch_ids_are_unique_within_a_second_and_sort_by_time() -> None:
    moment = datetime(2026, 11, 28, 17, 23, 42, 48213, tzinfo=UTC)
    same_second = {new_batch_id(moment) for _ in range(50)}
    assert len(same_second) == 50
    assert all(i.startswith("20261128T172342Z_048213-") for i in same_second)
    later = new_batch_id(moment.replace(microsecond=48214))
    earlier = new_batch_id(moment.replace(second=41, microsecond=999999))
    assert sorted([later, *same_second, earlier])[0] == earlier
    assert sorted([later, *same_second, earlier])[-1] == later
    for batch in (*same_second, OLD_ID, "20261102T000000Z_east-dc"):
        assert batch_id_of(f"{batch}.parquet") == batch  # old ids in landing roots still count
    assert batch_time(later) == moment.replace(microsecond=0)


@pytest.mark.parametrize(
    "bad", [f"{OLD_ID}\n", f"{OLD_ID}_east\n", "2026-11-02", f"{OLD_ID}_a b", "20261399T000000Z"]
)
def test_batch_ids_are_matched_whole(bad: str, tmp_path: Path) -> None:
    # `$` alone accepts a trailing newline: "20261102T000000Z\n" was a batch id.
    assert batch_id_of(f"{bad}.csv") is None
    with pytest.raises(InputFileError, match="is not a batch id"):
        batch_time(bad)
    with pytest.raises(InputFileError, match="is not a batch id"):
        Landing(str(tmp_path)).land(SAMPLE / "new_batch.csv.gz", UNSCORED, bad)
    assert not (tmp_path / UNSCORED).exists()


# -- land -----------------------------------------------------------------------------------------
def _together(count: int, action: Callable[[int], Any]) -> list[Any]:
    """Run `action(i)` on `count` threads released at once; each result or raised exception."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = action(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _lands_of_one_id(root: str) -> None:
    results = _together(
        6, lambda _: Landing(root).land(SAMPLE / "new_batch.csv.gz", UNSCORED, OLD_ID)
    )
    won = [r for r in results if isinstance(r, str)]
    lost = [r for r in results if not isinstance(r, str)]
    assert len(won) == 1, results
    assert all(isinstance(r, InputFileError) for r in lost), lost
    assert all(f"batch {OLD_ID} has landed already" in str(r) for r in lost), lost
    assert list(Landing(root).batches(UNSCORED)) == [OLD_ID]


def test_two_lands_of_one_id_one_wins_and_the_other_is_told(tmp_path: Path) -> None:
    _lands_of_one_id(str(tmp_path / "landing"))
    landed = sorted(p.name for p in (tmp_path / "landing" / UNSCORED).iterdir())
    assert landed == [f"{OLD_ID}.csv.gz"]  # no temporary files left behind
    original = (SAMPLE / "new_batch.csv.gz").read_bytes()
    assert (tmp_path / "landing" / UNSCORED / landed[0]).read_bytes() == original


def test_two_lands_of_one_id_on_s3_one_wins(s3_env: SeaweedS3) -> None:
    _lands_of_one_id(f"s3://{s3_env.make_bucket(_name('land'))}/backorder")


# -- leases ---------------------------------------------------------------------------------------
def _holder(root: str, batch: str) -> subprocess.Popen[str]:
    """Another process that takes the batch's lease and keeps it until it is killed."""
    code = (
        "import sys, time\n"
        "from backorder.catalog import Landing\n"
        f"lease = Landing({root!r}).take_lease('scoring', {batch!r})\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"  # it holds the lease now
    return holder


def _leases_behave(root: str) -> None:
    landing = Landing(root)
    lease = landing.take_lease(SCORING, OLD_ID)
    assert lease.held()
    with pytest.raises(BatchTaken, match=rf"{OLD_ID}: being scored by .*pid {os.getpid()}"):
        landing.take_lease(SCORING, OLD_ID)
    other = landing.take_lease(SCORING, "20261103T000000Z")  # other batches are free
    other.release()
    lease.release()
    assert not lease.held()
    again = landing.take_lease(SCORING, OLD_ID)
    again.release()

    # A holder killed with SIGKILL on this machine: its lease is taken over at once.
    holder = _holder(root, OLD_ID)
    try:
        with pytest.raises(BatchTaken, match=f"pid {holder.pid}"):
            landing.take_lease(SCORING, OLD_ID)
    finally:
        holder.kill()
        holder.wait()
    taken = landing.take_lease(SCORING, OLD_ID)
    assert taken.held()
    taken.release()

    # An expired lease (its holder elsewhere, unknown) is taken over by exactly one runner.
    landing.take_lease(SCORING, OLD_ID, seconds=0)
    results = _together(5, lambda _: Landing(root).take_lease(SCORING, OLD_ID))
    won = [r for r in results if not isinstance(r, Exception)]
    assert len(won) == 1, results
    assert all(isinstance(r, BatchTaken) for r in results if r not in won), results
    assert won[0].held()
    won[0].release()


def test_a_batch_lease_has_one_holder_until_released_expired_or_its_process_died(
    tmp_path: Path,
) -> None:
    _leases_behave(str(tmp_path / "landing"))


def test_batch_leases_on_s3(s3_env: SeaweedS3) -> None:
    _leases_behave(f"s3://{s3_env.make_bucket(_name('lease'))}/backorder")


# -- score-pending --------------------------------------------------------------------------------
def _home_with_champion_v2(trained_home: Path, home: Path) -> Path:
    """A copy of the trained registry whose champion is v2 (the same model registered again),
    so that two runners with different homes score with different versions."""
    from mlflow.tracking import MlflowClient

    from backorder.registry import Registry

    shutil.copytree(trained_home, home)
    registry = Registry(make_settings(home))
    client: MlflowClient = registry.client
    first = client.get_model_version(registry.name, "1")
    client.create_model_version(
        registry.name, first.source, first.run_id, tags=first.tags, model_id=first.model_id
    )
    registry.promote("2")
    return home


def test_two_concurrent_score_pending_score_each_batch_once(
    trained_home: Path, tmp_path: Path
) -> None:
    root = tmp_path / "landing"
    batches = ["20261102T000000Z", "20261103T000000Z"]
    for batch in batches:
        Landing(str(root)).land(SAMPLE / "new_batch.csv.gz", UNSCORED, batch)
    homes = [tmp_path / "home-v1", _home_with_champion_v2(trained_home, tmp_path / "home-v2")]
    shutil.copytree(trained_home, homes[0])
    quick = {"BACKORDER_COMPILED_TREES": "false"}  # compiling would only slow both down
    runners = [
        cli_process("score-pending", "--root", str(root), home=home, env=quick) for home in homes
    ]
    outputs = [runner.communicate(timeout=300) for runner in runners]
    for runner, (_, stderr) in zip(runners, outputs, strict=True):
        assert runner.returncode == 0, stderr
    counts = [int(re.fullmatch(r"scored (\d+) batch\(es\)\n", out)[1]) for out, _ in outputs]
    assert sum(counts) == len(batches), outputs  # each batch once, by one of the two
    skipped = re.findall(r"skipped batch (\S+): ", "".join(err for _, err in outputs))
    assert skipped, outputs  # the runner that met a batch taken said so

    records = Landing(str(root)).records(SCORING)
    assert sorted(records) == batches
    for batch, record in records.items():
        predictions = pd.read_parquet(root / "predictions" / f"{batch}.parquet")
        # The manifest names the model that wrote the predictions, and their number.
        assert set(predictions["model_version"]) == {record["model_version"]}, batch
        assert len(predictions) == record["scored"], batch
    assert {r["model_version"] for r in records.values()} <= {"1", "2"}


# -- a run killed in the middle of a batch --------------------------------------------------------
BATCH = "20261110T000000Z"


def _big_input(path: Path, copies: int) -> tuple[Path, int]:
    """The bundled batch ``copies`` times over: 16 chunks of 64 KiB per copy."""
    frame = pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False)
    frame = frame[frame["national_inv"] != ""]  # the footer line
    pd.concat([frame] * copies, ignore_index=True).to_csv(path, index=False)
    return path, copies * len(frame)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Output:
    """One kind of output: the CLI arguments that name it, whether a run has started writing
    it, and what a reader sees of it (rows of the batch, for a reader who follows the docs)."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind, self.tmp = kind, tmp_path
        self.spool = tmp_path / "tmp"  # the killed run's TMPDIR
        self.spool.mkdir()
        table = _name("predictions_")
        if kind == "file":
            self.args = ["--output", str(tmp_path / "out" / "predictions.parquet")]
        elif kind == "s3":
            bucket = request.getfixturevalue("s3_env").make_bucket(_name("killed"))
            self.args = ["--output", f"s3://{bucket}/out/predictions.parquet"]
        elif kind == "postgresql":
            self.url = request.getfixturevalue("postgres_server").plain_url
            self.args = ["--output", self.url, "--output-table", table]
        else:
            self.mongo = request.getfixturevalue("mongo_server")
            self.args = ["--output", self.mongo.url, "--output-table", table]
        self.target, self.table = self.args[1], table
        if kind in ("postgresql", "mongodb"):
            self.target = f"{self.target}#{table}"

    def started(self) -> bool:
        """The run has written its first chunk (not yet visible to readers)."""
        if self.kind in ("file", "s3"):
            # A local temporary file beside the target, or in TMPDIR before the one upload.
            folder = self.tmp / "out" if self.kind == "file" else self.spool
            pattern = (
                ".predictions.parquet.*.tmp" if self.kind == "file" else "*-predictions.parquet"
            )
            return any(p.stat().st_size > 4096 for p in folder.glob(pattern))
        if self.kind == "postgresql":
            engine = sa.create_engine(sqlalchemy_url(self.url))
            with engine.connect() as connection:
                writing = connection.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE :q"),
                    {"q": f"INSERT INTO {self.table} %"},
                ).scalar_one()
            engine.dispose()
            return bool(writing)
        with self.mongo.client() as client:
            return client.get_default_database()[self.table].count_documents({}) > 0

    def rows(self) -> pd.DataFrame | None:
        """The batch as a reader sees it; None when there is nothing to see."""
        if self.kind in ("file", "s3"):
            fs, path = fsspec.core.url_to_fs(self.target)
            fs.invalidate_cache()
            return pd.read_parquet(self.target) if fs.exists(path) else None
        if self.kind == "postgresql":
            engine = sa.create_engine(sqlalchemy_url(self.url))
            try:
                if not sa.inspect(engine).has_table(self.table):
                    return None
                found = pd.read_sql_query(
                    sa.text(f'SELECT * FROM "{self.table}" WHERE batch_id = :b'),
                    engine,
                    params={"b": BATCH},
                )
            finally:
                engine.dispose()
            return found if len(found) else None
        # The documented read: only committed runs' documents.
        from backorder.databases import committed_filter

        with self.mongo.client() as client:
            database = client.get_default_database()
            found = committed_filter(database, self.table, BATCH)
            documents = list(database[self.table].find(found, {"_id": False}))
        return pd.DataFrame(documents) if documents else None


KINDS = ["file", "s3", "postgresql", "mongodb"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_killed_mid_batch_leaves_nothing_partial_and_a_rerun_gives_the_batch(
    kind: str, request: pytest.FixtureRequest, trained_settings: Settings, tmp_path: Path
) -> None:
    # Enough chunks that the kill lands mid-batch (the MongoDB test server inserts slowly).
    source, rows = _big_input(tmp_path / "big.csv", 1 if kind == "mongodb" else 4)
    output = Output(kind, request, tmp_path)
    args = ["predict", "--input", str(source), *output.args, "--batch-id", BATCH]
    env = {
        "BACKORDER_READ_BLOCK_BYTES": str(64 << 10),
        "BACKORDER_COMPILED_TREES": "false",
        "TMPDIR": str(output.spool),
    }
    run = cli_process(*args, home=trained_settings.home, env=env)
    try:
        _wait_for(lambda: output.started() or run.poll() is not None, "the first chunk")
        assert run.poll() is None, run.communicate()  # still in the middle of the batch
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.communicate()
    assert run.returncode == -signal.SIGKILL
    assert output.rows() is None  # no reader sees any of the killed run's rows

    # The re-run, in this process (the command line is proven above; this saves its start-up).
    model = Registry(trained_settings).load_for_scoring()
    again = predict_file(source, output.target, model, trained_settings, batch_id=BATCH)
    assert again.read == again.scored == rows
    seen = output.rows()
    assert seen is not None and len(seen) == rows  # exactly the whole batch, once
    assert seen["row_number"].is_unique and sorted(seen["row_number"]) == list(range(1, rows + 1))


# -- MongoDB: commit markers, the read filter, and the clean-up of runs no reader will read -------
def _mongo_rows(database: Any, table: str, batch: str) -> pd.DataFrame:
    from backorder.databases import committed_filter

    found = database[table].find(committed_filter(database, table, batch), {"_id": False})
    return pd.DataFrame(list(found))


def test_mongodb_readers_see_committed_runs_only_and_dead_runs_are_cleaned_up(
    request: pytest.FixtureRequest,
) -> None:
    from backorder.databases import ABANDONED_AFTER_SECONDS, commits_collection
    from backorder.io import open_output

    mongo = request.getfixturevalue("mongo_server")
    table = _name("predictions_")
    uri = f"{mongo.url}#{table}"
    template = pd.DataFrame(
        {"row_number": pd.Series(dtype="int64"), "p": pd.Series(dtype="float64")}
    )

    def rows(n: int, p: float) -> pd.DataFrame:
        return pd.DataFrame({"row_number": range(1, n + 1), "p": [p] * n})

    client = mongo.client()
    database = client.get_default_database()
    try:
        # A run that dies after writing part of the batch: never committed, never aborted.
        dead = open_output(uri, template, BATCH)
        dead.write(rows(30, 0.1))
        assert _mongo_rows(database, table, BATCH).empty  # the documented read sees nothing
        assert database[table].count_documents({"batch_id": BATCH}) == 30  # but it is there

        first = open_output(uri, template, BATCH)
        first.write(rows(50, 0.2))
        first.commit()
        assert _mongo_rows(database, table, BATCH)["p"].tolist() == [0.2] * 50

        # A re-run replaces the batch at its commit; the run it replaced is deleted by the
        # next write, not at once (a reader may be reading it), and the dead run only once
        # it has been quiet for ABANDONED_AFTER_SECONDS.
        second = open_output(uri, template, BATCH)
        second.write(rows(40, 0.3))
        second.commit()
        assert _mongo_rows(database, table, BATCH)["p"].tolist() == [0.3] * 40
        commits = database[commits_collection(table)]
        commits.update_many(
            {"_id": f"run:{dead.run_id}"},  # type: ignore[attr-defined]
            {"$set": {"alive": time.time() - ABANDONED_AFTER_SECONDS - 1}},
        )
        other = open_output(uri, template, "20261111T000000Z")  # the next write, another batch
        other.write(rows(5, 0.5))
        other.commit()
        assert database[table].count_documents({"batch_id": BATCH}) == 40
        assert _mongo_rows(database, table, "20261111T000000Z")["p"].tolist() == [0.5] * 5

        # A run taken back after its commit (its rejects' sibling failed): the batch is again
        # what the run before it committed.
        taken_back = open_output(uri, template, BATCH)
        taken_back.write(rows(10, 0.9))
        taken_back.commit()
        taken_back.discard()
        assert _mongo_rows(database, table, BATCH)["p"].tolist() == [0.3] * 40
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["postgresql", "mongodb"])
def test_two_predicts_in_the_same_second_to_one_table_keep_both_batches(
    kind: str, request: pytest.FixtureRequest, trained_settings: Settings, tmp_path: Path
) -> None:
    small = tmp_path / "small.csv"
    pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False).head(200).to_csv(
        small, index=False
    )
    server = request.getfixturevalue(f"{'postgres' if kind == 'postgresql' else 'mongo'}_server")
    base = server.plain_url if kind == "postgresql" else server.url
    quick = trained_settings.model_copy(update={"compiled_trees": False})
    models = [Registry(quick).load_for_scoring() for _ in range(2)]  # one per thread
    for _ in range(5):  # until the two runs start in the same second (nearly always at once)
        table = _name("predictions_")
        target = f"{base}#{table}"
        runs = _together(2, lambda i, target=target: predict_file(small, target, models[i], quick))
        assert not [r for r in runs if isinstance(r, Exception)], runs
        if runs[0].batch_id[:16] == runs[1].batch_id[:16]:
            break
    else:
        pytest.fail("no two runs started in the same second")
    assert runs[0].batch_id != runs[1].batch_id
    for run in runs:
        if kind == "postgresql":
            engine = sa.create_engine(sqlalchemy_url(base))
            with engine.connect() as connection:
                kept = connection.execute(
                    sa.text(f'SELECT count(*) FROM "{table}" WHERE batch_id = :b'),
                    {"b": run.batch_id},
                ).scalar_one()
            engine.dispose()
        else:
            with server.client() as client:
                kept = len(_mongo_rows(client.get_default_database(), table, run.batch_id))
        assert kept == run.scored == 200, run.batch_id
