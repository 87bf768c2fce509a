"""Dask: a partitioned dataset scored on a LocalCluster, with the counts of every partition
reconciled, and the same result as scoring the files one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from backorder.config import Settings
from backorder.dask_engine import predict_partitioned, train_partitioned
from backorder.data import load_labelled
from backorder.errors import BackorderError, InputFileError
from backorder.predict import predict_file
from backorder.registry import Registry
from backorder.train import holdout_mask
from tests.conftest import SAMPLE, make_settings, run_cli

pytest.importorskip("dask.distributed")


def _partitioned(folder: Path) -> list[Path]:
    frame = pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False)
    frame = frame[frame["national_inv"] != ""]  # the footer line
    folder.mkdir()
    paths = []
    for i in range(3):
        part = frame.iloc[i * 3000 : (i + 1) * 3000]
        path = folder / f"part-{i}.parquet"
        part.to_parquet(path, index=False)
        paths.append(path)
    bad = frame.iloc[9000:9100].copy()
    bad.loc[bad.index[:2], "lead_time"] = "soon"  # two rows to quarantine
    bad.to_csv(folder / "part-3.csv", index=False)
    paths.append(folder / "part-3.csv")
    return paths


def test_dask_scores_every_partition_like_the_local_engine(
    trained_settings: Settings, tmp_path: Path
) -> None:
    paths = _partitioned(tmp_path / "in")
    totals = predict_partitioned(
        str(tmp_path / "in"), str(tmp_path / "out"), trained_settings, workers=2
    )
    assert totals["read"] == 9100 and totals["rejected"] == 2 and totals["scored"] == 9098
    assert len(totals["partitions"]) == 4
    marker = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert marker["scored"] == 9098

    model = Registry(trained_settings).load("champion")
    for path in paths:
        name = path.name.split(".")[0]
        local = predict_file(path, tmp_path / "local" / f"{name}.parquet", model, trained_settings)
        on_dask = pd.read_parquet(tmp_path / "out" / f"{name}.parquet")
        expected = pd.read_parquet(local.output)
        assert len(on_dask) == local.scored
        pd.testing.assert_series_equal(
            on_dask["backorder_probability"], expected["backorder_probability"], rtol=0, atol=1e-9
        )
    rejects = pd.read_parquet(tmp_path / "out" / "part-3.rejects.parquet")
    assert rejects["reason"].str.contains("lead_time: not a number: 'soon'").all()

    # A re-run replaces each partition's files: nothing duplicates.
    predict_partitioned(str(tmp_path / "in"), str(tmp_path / "out"), trained_settings, workers=1)
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 8


def test_dask_cli_and_a_folder_with_nothing_to_score(
    trained_settings: Settings, tmp_path: Path
) -> None:
    _partitioned(tmp_path / "in")
    result = run_cli(
        "predict",
        "--engine",
        "dask",
        "--workers",
        "1",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        home=trained_settings.home,
    )
    assert result.returncode == 0, result.stderr
    assert "read 9,100 rows in 4 partition(s): scored 9,098" in result.stdout
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackorderError, match="no Parquet or CSV files"):
        predict_partitioned(str(tmp_path / "empty"), str(tmp_path / "o"), trained_settings)


def test_dask_training_registers_a_calibrated_model_with_the_local_holdout(
    tmp_path: Path,
) -> None:
    frame = pd.read_csv(SAMPLE / "labelled.csv.gz", dtype=str, keep_default_na=False)
    folder = tmp_path / "labelled"
    folder.mkdir()
    for i in range(3):
        frame.iloc[i::4].to_parquet(folder / f"part-{i}.parquet", index=False)
    last = frame.iloc[3::4].copy()
    last.loc[last.index[:2], "lead_time"] = "soon"  # two rows to quarantine
    last.to_csv(folder / "part-3.csv", index=False)
    settings = make_settings(tmp_path / "home")

    outcome = train_partitioned(str(folder), settings, output_dir=tmp_path / "run", workers=2)

    assert sum(s.read for s in outcome.data.sources) == len(frame)
    assert sum(s.rejected for s in outcome.data.sources) == 2
    assert len(pd.read_csv(outcome.rejects_file)) == 2
    # The same rows are held out for promotion as `backorder train` holds out on this data.
    local = load_labelled([SAMPLE / "labelled.csv.gz"], settings.read_block_bytes).rows
    expected_holdout = holdout_mask(local, settings.holdout_fraction)
    assert outcome.holdout is not None
    assert abs(outcome.holdout["n_rows"] - int(expected_holdout.sum())) <= 2
    # It learned and is calibrated: holdout ranking far above chance, mean probability near
    # the rate of backorders in the rows it scores.
    base_rate = float((frame["went_on_backorder"] == "Yes").mean())
    assert outcome.holdout["average_precision"] > 5 * base_rate
    assert outcome.promoted and outcome.version == "1"
    loaded = Registry(settings).load("champion", with_reference=True)
    assert loaded.reference is not None
    p = loaded.probability(local)
    assert 0.5 * base_rate < p.mean() < 2 * base_rate
    metrics = json.loads(outcome.metrics_file.read_text())
    assert metrics["model"]["trees"] == loaded.classifier.n_trees_


def test_cli_train_dask_needs_one_partitioned_folder(tmp_path: Path) -> None:
    result = run_cli(
        "train",
        "--engine",
        "dask",
        "--data",
        str(tmp_path / "a"),
        "--data",
        str(tmp_path / "b"),
        home=tmp_path / "home",
    )
    assert result.returncode == 2 and "one --data folder" in result.stderr


def test_one_input_name_in_two_formats_is_refused(
    trained_settings: Settings, tmp_path: Path
) -> None:
    frame = pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False).head(50)
    folder = tmp_path / "in"
    folder.mkdir()
    frame.to_csv(folder / "a.csv", index=False)
    frame.to_parquet(folder / "a.parquet", index=False)  # both would be scored into a.parquet
    frame.to_csv(folder / "b.csv", index=False)
    with pytest.raises(InputFileError, match=r"in: a\.csv and a\.parquet would both be scored"):
        predict_partitioned(str(folder), str(tmp_path / "out"), trained_settings, workers=1)
    assert not (tmp_path / "out").exists()


def test_a_rerun_removes_the_success_marker_before_it_replaces_partitions(
    trained_settings: Settings, tmp_path: Path
) -> None:
    from backorder.dask_engine import dask_client

    settings = trained_settings.model_copy(update={"compiled_trees": False})  # faster here
    frame = pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False)
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(2):
        frame.iloc[i * 500 : (i + 1) * 500].to_csv(folder / f"part-{i}.csv", index=False)
    with dask_client(None, 1) as client:  # one cluster for both runs
        address = client.scheduler.address
        predict_partitioned(str(folder), str(out), settings, scheduler=address)
        assert (out / "_SUCCESS.json").is_file()
        (folder / "part-1.csv").write_text("sku,national_inv\n1,5\n")  # this partition fails
        with pytest.raises(BackorderError, match="1 of 2 partition"):
            predict_partitioned(str(folder), str(out), settings, scheduler=address)
    # part-0 was replaced by the re-run: the old marker must not vouch for the mix.
    assert not (out / "_SUCCESS.json").exists()
