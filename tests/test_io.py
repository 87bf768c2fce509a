"""Reading inputs of every shape, failing fast on whole-file problems, writing atomically."""

from __future__ import annotations

import gzip
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from backorder.config import Settings
from backorder.contract import FEATURE_COLUMNS, LABEL
from backorder.data import load_labelled, validated_chunks
from backorder.errors import InputFileError
from backorder.io import InputTable, TableWriter

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "labelled.csv.gz"


def sample_lines(n: int = 200) -> list[str]:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as handle:
        return [next(handle).rstrip("\n") for _ in range(n + 1)]


def write(path: Path, lines: list[str], *, eol: str = "\n", bom: bool = False) -> Path:
    text = ("\ufeff" if bom else "") + eol.join(lines) + eol
    path.write_bytes(text.encode("utf-8"))
    return path


def read_all(path: Path, require_label: bool = True, block_bytes: int = 1 << 16):
    table = InputTable(path, block_bytes=block_bytes)
    chunks = list(validated_chunks(table, require_label=require_label))
    rows = pd.concat([c.rows for c in chunks])
    rejects = pd.concat([c.rejects for c in chunks], ignore_index=True)
    return rows, rejects, sum(c.n_read for c in chunks)


# -- whole-file problems --------------------------------------------------------------------
def whole_file_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    lines = sample_lines(5)
    header = lines[0].split(",")
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp / "nope.csv", "file not found")
    (tmp / "empty.csv").write_bytes(b"")
    cases["empty"] = (tmp / "empty.csv", "file is empty")
    (tmp / "folder.csv").mkdir()
    cases["directory"] = (tmp / "folder.csv", "is a directory")
    (tmp / "binary.csv").write_bytes(bytes(range(256)) * 10)
    cases["binary"] = (tmp / "binary.csv", "binary file")
    with zipfile.ZipFile(tmp / "book.xlsx", "w") as z:
        z.writestr("sheet.xml", "<x/>")
    cases["excel"] = (tmp / "book.xlsx", "ZIP or Excel")
    write(tmp / "semicolon.csv", [line.replace(",", ";") for line in lines])
    cases["semicolon"] = (tmp / "semicolon.csv", "separated by ';'")
    write(tmp / "tabs.csv", [line.replace(",", "\t") for line in lines])
    cases["tab"] = (tmp / "tabs.csv", "separated by tab")
    drop = header.index("national_inv")
    write(
        tmp / "nocol.csv",
        [",".join(f for i, f in enumerate(line.split(",")) if i != drop) for line in lines],
    )
    cases["missing column"] = (tmp / "nocol.csv", "missing required column(s) national_inv")
    (tmp / "utf16.csv").write_text("\n".join(lines), encoding="utf-16")
    cases["utf-16"] = (tmp / "utf16.csv", "UTF-16")
    (tmp / "config.json").write_text('{"national": 1, "rows": [1, 2]}\n')
    cases["json"] = (tmp / "config.json", "none of the expected columns")
    write(tmp / "header_only.csv", lines[:1])
    cases["header only"] = (tmp / "header_only.csv", "no data rows")
    (tmp / "latin1.csv").write_bytes(
        ("\n".join(lines) + "\nstra\xdfe").encode("latin-1").replace(b"sku", b"sk\xe9")
    )
    cases["not utf-8"] = (tmp / "latin1.csv", "not UTF-8")
    small = gzip.compress(("\n".join(lines) + "\n").encode())
    (tmp / "truncated.csv.gz").write_bytes(small[: len(small) // 2])
    cases["truncated gzip"] = (tmp / "truncated.csv.gz", "cannot be read")
    big = gzip.compress(("\n".join(sample_lines(20_000)) + "\n").encode())
    (tmp / "cut.csv.gz").write_bytes(big[: len(big) // 2])
    cases["truncated big gzip"] = (tmp / "cut.csv.gz", "cannot be read")
    (tmp / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 100)
    cases["corrupt parquet"] = (tmp / "broken.parquet", "Parquet")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "directory",
        "binary",
        "excel",
        "utf-16",
        "json",
        "semicolon",
        "tab",
        "missing column",
        "header only",
        "not utf-8",
        "truncated gzip",
        "truncated big gzip",
        "corrupt parquet",
    ],
)
def test_whole_file_problems_name_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    path, message = whole_file_cases(tmp_path)[case]
    with pytest.raises(InputFileError) as error:
        read_all(path)
    text = str(error.value)
    assert str(path) in text and message in text
    assert "\n" not in text


# -- unusual but valid files ----------------------------------------------------------------
def test_bom_crlf_quotes_column_order_and_extra_columns(tmp_path: Path) -> None:
    lines = sample_lines(50)
    plain_rows, _, _ = read_all(write(tmp_path / "plain.csv", lines))

    frame = pd.read_csv(SAMPLE, nrows=50, dtype=str, keep_default_na=False)
    shuffled = frame[list(reversed(frame.columns))].assign(comment='has, a "comma"')
    shuffled.to_csv(
        tmp_path / "odd.csv", index=False, lineterminator="\r\n", quoting=1, encoding="utf-8-sig"
    )
    odd_rows, rejects, n_read = read_all(tmp_path / "odd.csv")
    assert rejects.empty and n_read == 50
    pd.testing.assert_frame_equal(odd_rows[plain_rows.columns], plain_rows)


def test_csv_gzip_and_parquet_give_the_same_rows(tmp_path: Path) -> None:
    lines = sample_lines(300)
    plain, _, _ = read_all(write(tmp_path / "a.csv", lines))
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress((tmp_path / "a.csv").read_bytes()))
    zipped, _, _ = read_all(tmp_path / "a.csv.gz")
    typed = pd.read_csv(tmp_path / "a.csv", dtype={"sku": str})
    typed.to_parquet(tmp_path / "a.parquet")
    parquet, rejects, _ = read_all(tmp_path / "a.parquet")
    assert rejects.empty
    pd.testing.assert_frame_equal(zipped, plain)
    pd.testing.assert_frame_equal(parquet[plain.columns], plain, check_dtype=False)


def test_row_numbers_survive_chunking_and_broken_lines(tmp_path: Path) -> None:
    lines = sample_lines(3000)
    lines[11] += ",extra"  # data row 11
    lines[501] = ""  # data row 501: an empty line
    lines[1001] = lines[1001].replace(",No,", ",Perhaps,", 1)
    lines.append("(3000 rows)")
    path = write(tmp_path / "messy.csv", lines, eol="\r\n", bom=True)
    rows, rejects, n_read = read_all(path, block_bytes=1 << 16)  # dozens of chunks
    assert n_read == 3001 == len(rows) + len(rejects)
    assert sorted(rejects["row_number"]) == [11, 501, 1001, 3001]
    by_row = dict(zip(rejects["row_number"], rejects["reason"], strict=True))
    assert by_row[11] == "has 24 field(s), expected 23"
    assert "empty line" in by_row[501]
    assert "Perhaps" in by_row[1001]
    assert by_row[3001].startswith("row-count footer")
    assert rejects.set_index("row_number").loc[11, "original_line"].endswith(",extra")
    # Every kept row's number points at its own line of the file.
    skus = {n: lines[n].split(",")[0] for n in rows.index}
    assert (rows["sku"] == pd.Series(skus)).all()


def test_files_without_sku_and_with_preprocessed_layout(tmp_path: Path) -> None:
    frame = pd.read_csv(SAMPLE, nrows=100)
    pre = frame.drop(columns=["sku"])
    pre[LABEL] = (pre[LABEL] == "Yes").astype(int)
    for column in ("perf_6_month_avg", "perf_12_month_avg"):
        pre[column] = pre[column].replace(-99.0, np.nan)
    pre.to_csv(tmp_path / "pre.csv", index=False, float_format="%.2f")
    rows, rejects, _ = read_all(tmp_path / "pre.csv")
    assert rejects.empty and len(rows) == 100 and "sku" not in rows.columns
    raw_rows, _, _ = read_all(write(tmp_path / "raw.csv", sample_lines(100)))
    pd.testing.assert_frame_equal(rows[list(FEATURE_COLUMNS)], raw_rows[list(FEATURE_COLUMNS)])


def test_later_inputs_drop_rows_repeated_from_earlier_ones(tmp_path: Path) -> None:
    lines = sample_lines(100)
    write(tmp_path / "a.csv", lines[:61])
    # rows 41-60 repeat; row 1 repeats with the other label (same features: still a repeat)
    flipped = lines[1].rsplit(",", 1)
    flipped[1] = "Yes" if flipped[1].strip() == "No" else "No"
    write(tmp_path / "b.csv", [lines[0], *lines[41:101], ",".join(flipped)])
    data = load_labelled([tmp_path / "a.csv", tmp_path / "b.csv"], block_bytes=1 << 16)
    assert [s.duplicates_dropped for s in data.sources] == [0, 21]
    assert len(data.rows) == 100


# -- writing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["out.parquet", "out.csv", "out.csv.gz"])
def test_table_writer_is_atomic(tmp_path: Path, name: str) -> None:
    template = pd.DataFrame({"a": pd.Series(dtype="int64"), "b": pd.Series(dtype="string")})
    target = tmp_path / name
    writer = TableWriter(target, template)
    writer.write(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    assert not target.exists()  # nothing visible until commit
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = TableWriter(target, template)
    writer.write(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == [name]
    back = pd.read_parquet(target) if name.endswith("parquet") else pd.read_csv(target)
    assert back["a"].tolist() == [1, 2]


def test_unknown_output_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"out\.xlsx: output must end with"):
        TableWriter(tmp_path / "out.xlsx", pd.DataFrame({"a": [1]}))


def test_prefetch_keeps_order_and_raises_the_producers_error() -> None:
    from backorder.io import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        raise InputFileError("x.csv: cannot be read (truncated)")

    got: list[int] = []
    with pytest.raises(InputFileError, match="truncated"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]

    # A consumer that stops early stops the producer as well.
    produced: list[int] = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    settled = len(produced)
    time.sleep(0.2)
    assert len(produced) == settled <= 7


def test_background_sink_reports_a_failed_write_and_leaves_nothing(tmp_path: Path) -> None:
    from backorder.io import BackgroundSink

    target = tmp_path / "out.parquet"
    sink = BackgroundSink(TableWriter(target, pd.DataFrame({"a": pd.Series(dtype="int64")})))
    sink.write(pd.DataFrame({"a": [1, 2]}))
    sink.write(pd.DataFrame({"a": ["not a number"]}))  # fails on the writer thread
    with pytest.raises((ValueError, TypeError, pa.ArrowException)):
        sink.commit()
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_one_suffix_rule_names_table_files() -> None:
    from backorder.io import table_format, table_suffix
    from backorder.predict import default_rejects_path

    assert table_suffix("s3://b/k/part.0.CSV.gz") == ".CSV.gz"
    assert table_suffix("x.parquet.bak") is None
    assert [table_format(n) for n in ("a.pq", "a.Parquet", "a.csv", "a.csv.gz")] == [
        "parquet",
        "parquet",
        "csv",
        "csv.gz",
    ]
    assert default_rejects_path("out/p.csv.gz") == "out/p.rejects.csv.gz"
    with pytest.raises(InputFileError, match=r"x\.txt: output must end with"):
        default_rejects_path("x.txt")


def test_predict_file_scores_an_input_opened_already(
    tmp_path: Path, trained_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`backorder predict` checks its input before loading the model, then scores that same
    opened input: it is not opened a second time."""
    from backorder import predict
    from backorder.registry import Registry

    batch = ROOT / "data" / "sample" / "new_batch.csv.gz"
    table = InputTable(batch)
    model = Registry(trained_settings).load("champion")

    def opened_again(*_: object, **__: object) -> None:
        raise AssertionError("the input was opened a second time")

    monkeypatch.setattr(predict, "open_input", opened_again)
    summary = predict.predict_file(table, tmp_path / "p.parquet", model, trained_settings)
    assert summary.input == str(batch)
    assert summary.read == summary.scored + summary.rejected > 0
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == summary.scored
