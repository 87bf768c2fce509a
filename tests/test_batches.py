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
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from backorder.catalog import (
    SCORING,
    UNSCORED,
    BatchTaken,
    Landing,
    batch_id_of,
    batch_time,
)
from backorder.errors import InputFileError
from backorder.predict import new_batch_id
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
