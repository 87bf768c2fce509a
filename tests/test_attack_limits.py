"""A real `backorder serve` under attack: no client can hurt the others.

Two servers, each shared by the tests of its settings profile: `tight` (small upload limits,
one upload at a time) and `slow` (TreeSHAP reasons, one upload at a time, a short upload time
limit). Every case checks the status, that the message says what went wrong, and that the
server still answers `/healthz` afterwards.
"""

from __future__ import annotations

import gzip
import html
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backorder.web import FORM_DEFAULTS
from tests.conftest import SAMPLE
from tests.support.servers import serving
from tests.test_api import sample_records

MAX_BYTES = 4 << 20
MAX_ROWS = 20_000
UPLOAD_SECONDS = 3.0
# Limits of uploads and work, not identity (tests/test_attack_auth.py): anyone, unthrottled.
COMMON = {
    "BACKORDER_AUTH": "none",
    "BACKORDER_RATE_LIMIT_PER_MINUTE": "0",
    "BACKORDER_UPLOAD_CONCURRENCY": "1",
}
TIGHT = COMMON | {
    "BACKORDER_UPLOAD_MAX_BYTES": str(MAX_BYTES),
    "BACKORDER_UPLOAD_MAX_ROWS": str(MAX_ROWS),
}
SLOW = COMMON | {
    "BACKORDER_REASON_METHOD": "shap",
    "BACKORDER_UPLOAD_TIMEOUT_SECONDS": str(UPLOAD_SECONDS),
}
SAMPLE_LINES = gzip.decompress((SAMPLE / "new_batch.csv.gz").read_bytes()).splitlines(True)
HEADER, ROWS = SAMPLE_LINES[0], [line for line in SAMPLE_LINES[1:] if line[:1].isdigit()]


@pytest.fixture(scope="module")
def home(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's registry: the servers write into their home."""
    copy = tmp_path_factory.mktemp("attack") / "home"
    shutil.copytree(trained_home, copy)
    return copy


def _serve(home: Path, log: Path, env: dict[str, str]) -> Iterator[str]:
    with serving(home, log, timeout=180, env=env) as url:
        yield url
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), lines[:5]  # JSON logs only


@pytest.fixture(scope="module")
def tight(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(home, tmp_path_factory.mktemp("tight") / "serve.log", TIGHT)


@pytest.fixture(scope="module")
def slow(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(home, tmp_path_factory.mktemp("slow") / "serve.log", SLOW)


def assert_still_healthy(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


def upload(url: str, name: str, payload: bytes, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/upload", files={"file": (name, payload)}, timeout=120, **kwargs)


def upload_error(response: httpx.Response) -> str:
    """The one-line reason the page shows for a refused upload."""
    assert 'id="upload-error">' in response.text, response.text[:500]
    return html.unescape(response.text.split('id="upload-error">')[1].split("</p>")[0])


def small_csv(rows: int = 50) -> bytes:
    return HEADER + b"".join(ROWS[:rows])


def gzip_members(block: bytes, members: int) -> bytes:
    """`members` gzip members of `block` back to back: one valid gzip stream (as `cat a.gz b.gz`
    makes), a few MB that inflate to `members` times `block`."""
    return gzip.compress(block, compresslevel=9) * members


def parquet_bytes(frame: pd.DataFrame, **options: Any) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, **options)
    return buffer.getvalue()


def sample_frame(rows: int) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(HEADER + b"".join(ROWS)), dtype=str, keep_default_na=False)
    return pd.concat([frame] * (rows // len(frame) + 1), ignore_index=True).head(rows)


# -- sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "payload", "limit"),
    [
        # ~2.7 MB of gzip inflating to ~1.2 GB: refused after MAX_BYTES have been inflated.
        (
            "bytes.csv.gz",
            lambda: gzip.compress(HEADER) + gzip_members((b"9" * 999 + b"\n") * 65_000, 20),
            "bytes",
        ),
        # ~3 MB of gzip holding 13 million copies of a real row.
        ("rows.csv.gz", lambda: gzip_members(HEADER + ROWS[0] * 300_000, 45), "rows"),
        ("big.csv", lambda: HEADER + (b"9" * 999 + b"\n") * 5_000, "bytes"),  # 5 MB, plain
        ("rows.parquet", lambda: parquet_bytes(sample_frame(MAX_ROWS + 1)), "rows"),
        # 4,000 rows whose SKUs are 2 kB each: 8 MB uncompressed, a few kB on the wire.
        (
            "wide.parquet",
            lambda: parquet_bytes(
                sample_frame(4_000).assign(sku=lambda f: f["sku"].str.pad(2_000, fillchar="7")),
                use_dictionary=False,
                compression="zstd",
            ),
            "bytes",
        ),
    ],
)
def test_uploads_over_a_limit_are_refused_early_naming_it(
    tight: str, case: str, payload: Any, limit: str
) -> None:
    body = payload()
    if case.endswith(".gz"):
        assert len(body) < 4 << 20  # a few MB on the wire ...
    response = upload(tight, case, body)
    assert response.status_code == 413, upload_error(response)
    message = upload_error(response)
    if limit == "bytes":
        assert f"{case}: larger than {MAX_BYTES:,} bytes" in message
        assert f"upload_max_bytes = {MAX_BYTES}" in message
    else:
        assert f"{case}: more than {MAX_ROWS:,} rows" in message
        assert f"upload_max_rows = {MAX_ROWS}" in message
    assert_still_healthy(tight)


def test_bodies_over_the_limit_without_a_length_are_413(tight: str) -> None:
    """Chunked bodies (no Content-Length) are counted as they arrive; Starlette's form parser
    would make the error a 400."""

    def chunked(head: bytes, size: int, tail: bytes = b"") -> Iterator[bytes]:
        yield head
        for _ in range(size // (64 << 10)):
            yield b"7" * (64 << 10)
        yield tail

    boundary = "attackboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    cases = [
        ("/upload", f"multipart/form-data; boundary={boundary}", head, 11 << 20),
        ("/v1/predict", "application/json", b'{"records": [', 2 << 20),
    ]
    for path, content_type, start, size in cases:
        response = httpx.post(
            f"{tight}{path}",
            content=chunked(start, size, f"\r\n--{boundary}--\r\n".encode()),
            headers={"content-type": content_type},
            timeout=60,
        )
        assert response.status_code == 413, (path, response.text[:300])
        assert "request body larger than" in response.json()["detail"]
    assert_still_healthy(tight)


@pytest.mark.parametrize(
    ("name", "payload", "status", "message"),
    [
        ("book.xlsx", b"PK\x03\x04" + b"\x00" * 100, 415, "is a ZIP archive or Excel workbook"),
        ("batch.csv.xz", b"\xfd7zXZ\x00" + b"\x00" * 100, 415, "is xz-compressed"),
        ("batch.csv.bz2", b"BZh91AY&SY" + b"\x00" * 100, 415, "is bzip2-compressed"),
        (
            "batch.parquet.gz",
            gzip.compress(parquet_bytes(sample_frame(10))),
            415,
            "is compressed Parquet",
        ),
        ("cut.csv.gz", gzip.compress(small_csv())[:-200], 422, "gzip data is corrupt or truncated"),
        ("junk.parquet", b"PAR1" + b"\x01" * 100, 422, "not a readable Parquet file"),
        ("empty.csv", b"", 422, "empty.csv: file is empty"),
    ],
)
def test_other_formats_are_refused_clearly(
    tight: str, name: str, payload: bytes, status: int, message: str
) -> None:
    response = upload(tight, name, payload)
    assert response.status_code == status
    assert message in upload_error(response)
    assert "backorder-upload-" not in response.text  # no server paths in messages
    assert_still_healthy(tight)


# -- file names ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "choose a file to upload"),
        (".", "'.' is not a file name"),
        ("..", "'..' is not a file name"),
        ("../../", "'../../' is not a file name"),
        ("x" * 300 + ".csv", "longer than 255 characters"),
    ],
)
def test_unusable_file_names_are_422(tight: str, name: str, message: str) -> None:
    response = upload(tight, name, small_csv())
    assert response.status_code == 422
    assert message in upload_error(response)
    assert_still_healthy(tight)


def test_a_control_character_in_a_file_name_is_refused(tight: str) -> None:
    # httpx escapes control characters in file names; a hand-made body does not.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x07b.csv"\r\n\r\n'
        + small_csv()
        + b"\r\n--b--\r\n"
    )
    response = httpx.post(
        f"{tight}/upload", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code in {400, 422}
    assert "control characters" in upload_error(response) or "multipart" in upload_error(response)
    assert_still_healthy(tight)


@pytest.mark.parametrize(
    ("name", "download"),
    [
        ("прогноз.csv", "прогноз-scored.zip"),
        ("😀.csv.gz", "😀-scored.zip"),
        ("café batch.csv", "café batch-scored.zip"),
        ("50% off; (v2).csv", "50% off; (v2)-scored.zip"),
        ("C:\\Users\\planner\\batch.csv", "batch-scored.zip"),
    ],
)
def test_any_usable_file_name_gives_a_correct_download(
    tight: str, name: str, download: str
) -> None:
    payload = gzip.compress(small_csv()) if name.endswith(".gz") else small_csv()
    response = upload(tight, name, payload)
    assert response.status_code == 200, upload_error(response)
    disposition = response.headers["content-disposition"]
    disposition.encode("ascii")  # a header clients can read: ASCII only
    assert disposition.startswith('attachment; filename="')
    fallback = disposition.split('filename="')[1].split('"')[0]
    assert fallback.endswith("-scored.zip") and '"' not in fallback and ";" not in fallback
    if "filename*=" in disposition:
        assert unquote(disposition.split("filename*=UTF-8''")[1]) == download
    else:
        assert fallback == download
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.namelist() == ["predictions.csv", "rejects.csv", "summary.txt"]
    assert len(pd.read_csv(archive.open("predictions.csv"))) == 50
    assert_still_healthy(tight)


def test_a_path_in_the_file_name_never_reaches_the_disk(tight: str, tmp_path: Path) -> None:
    target = tmp_path / "escaped.csv"
    response = upload(tight, "../" * 12 + str(target).lstrip("/"), small_csv())
    assert response.status_code == 200
    assert 'filename="escaped-scored.zip"' in response.headers["content-disposition"]
    assert not target.exists() and not list(tmp_path.iterdir())
    assert_still_healthy(tight)


# -- the page's form -------------------------------------------------------------------------------
GOOD_FORM = {k: str(v) for k, v in FORM_DEFAULTS.items()}


@pytest.mark.parametrize(
    "fields",
    [
        GOOD_FORM | {"previous_values": "[]", "previous_probability": "0.1"},
        GOOD_FORM | {"previous_values": "5", "previous_probability": "0.1"},
        GOOD_FORM | {"previous_values": "null", "previous_probability": "0.1"},
        GOOD_FORM | {"previous_values": '"text"', "previous_probability": "0.1"},
        GOOD_FORM | {"previous_values": "[" * 100_000, "previous_probability": "0.1"},
        GOOD_FORM | {"previous_values": "{}", "previous_probability": "abc"},
        GOOD_FORM | {"previous_values": "{}", "previous_probability": "nan"},
        GOOD_FORM | {"previous_values": "{}", "previous_probability": "1e999"},
        GOOD_FORM | {"previous_values": "{}", "previous_probability": "-3"},
        GOOD_FORM
        | {"previous_values": '{"lead_time": [1, {"x": null}]}', "previous_probability": "0.1"},
        GOOD_FORM | {"colour": "red", "sku": "\x00<script>"},
    ],
)
def test_malformed_hidden_fields_still_give_the_result(tight: str, fields: dict[str, str]) -> None:
    response = httpx.post(f"{tight}/", data=fields, timeout=30)
    assert response.status_code == 200
    assert 'id="probability"' in response.text and "<script>" not in response.text
    assert_still_healthy(tight)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"national_inv=abc&lead_time=-1",
        b"sku=%FF%FE&national_inv=%00",
        b"=&&==&national_inv",
        b"sku=" + b"x" * 1000,
        b"national_inv=1e999&lead_time=nan",
    ],
)
def test_malformed_form_fields_are_a_422_page(tight: str, body: bytes) -> None:
    response = httpx.post(
        f"{tight}/",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert response.status_code == 422
    assert "Some fields need a fix" in response.text and 'class="msg"' in response.text
    assert_still_healthy(tight)


# -- what real clients send ------------------------------------------------------------------------
def test_a_numeric_sku_is_scored_like_its_text(tight: str) -> None:
    record = sample_records(1)[0]
    answers = {}
    for sku in ["3285000", 3285000, 3285000.0]:
        response = httpx.post(
            f"{tight}/v1/predict", json={"records": [record | {"sku": sku}]}, timeout=30
        )
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["sku"] == "3285000"
        answers[repr(sku)] = prediction["backorder_probability"]
    assert len(set(answers.values())) == 1, answers
    # The way pandas writes a frame with numeric SKUs, e.g. `df.to_json(orient="records")`.
    frame = pd.DataFrame(sample_records(3)).assign(sku=[3285000, 3285001, 3285002])
    body = '{"records": ' + frame.to_json(orient="records") + "}"
    response = httpx.post(
        f"{tight}/v1/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert [p["sku"] for p in response.json()["predictions"]] == ["3285000", "3285001", "3285002"]
    for refused in [True, 12.5, {"id": 1}, [3285000]]:
        response = httpx.post(
            f"{tight}/v1/predict", json={"records": [record | {"sku": refused}]}, timeout=30
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "records", 0, "sku"]
    assert_still_healthy(tight)


# -- heavy work never delays light requests --------------------------------------------------------
HEAVY_CLIENT = """
import json, sys, time, httpx
url, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = open(path, "rb").read()
with httpx.Client(timeout=300) as client:
    for _ in range(count):
        start = time.monotonic()
        answer = client.post(url, content=body, headers={"content-type": "application/json"})
        end = time.monotonic()
        n = answer.content.count(b'"backorder_probability"')  # cheaper than parsing it
        print(json.dumps({"start": start, "end": end, "status": answer.status_code, "n": n}))
"""
Probe = tuple[float, float, float]  # start, /healthz ms, single-record /v1/predict ms
# Over this load average per core, other work decides latencies (single-record p50 went from
# ~2 to ~20 ms at load 9 on 2 cores), not the server: nothing can be measured.
BUSY_LOAD_PER_CORE = 2.0


def _probe(client: httpx.Client, url: str, single: bytes) -> Probe:
    start = time.monotonic()
    assert client.get(f"{url}/healthz").status_code == 200
    middle = time.monotonic()
    answer = client.post(
        f"{url}/v1/predict", content=single, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200
    return start, 1000 * (middle - start), 1000 * (time.monotonic() - middle)


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def _rounds(client: httpx.Client, url: str, heavy: Path, single: bytes) -> dict[str, Any]:
    """Two rounds of: 150 probes, then probes for as long as two heavy requests take. The
    report, and whether the probes met the bounds."""
    usual: list[Probe] = []
    during: list[Probe] = []
    runs: list[dict[str, Any]] = []
    for _ in range(2):
        usual += [_probe(client, url, single) for _ in range(150)]
        heavy_client = subprocess.Popen(
            [sys.executable, "-c", HEAVY_CLIENT, f"{url}/v1/predict", str(heavy), "2"],
            stdout=subprocess.PIPE,
            text=True,
            # The test's own machinery yields the CPU to what is measured, as the workers do.
            preexec_fn=lambda: os.nice(10),  # noqa: PLW1509 -- one syscall, no locks
        )
        probes = []
        while heavy_client.poll() is None:
            probes.append(_probe(client, url, single))
        out, _ = heavy_client.communicate()
        these = [json.loads(line) for line in out.splitlines()]
        runs += these
        during += [p for p in probes if these[0]["start"] <= p[0] <= these[-1]["end"]]
    assert [(r["status"], r["n"]) for r in runs] == [(200, 1000)] * 4
    report: dict[str, Any] = {
        "heavy seconds": [round(r["end"] - r["start"], 2) for r in runs],
        "probes during": len(during),
        "ok": len(during) >= 20,  # the heavy requests were long enough to measure
    }
    for column, what in [(1, "healthz"), (2, "predict")]:
        before, meanwhile = [p[column] for p in usual], [p[column] for p in during or usual]
        report[what] = {
            f"{name} p50/p95/max ms": [
                round(statistics.median(times), 2),
                round(_p95(times), 2),
                round(max(times), 2),
            ]
            for name, times in [("usual", before), ("during", meanwhile)]
        }
        # Within a few ms of the usual: p95 less than 5 ms above it. (Not the worst case: one
        # probe on a busy 2-core machine can wait for anything, heavy request or not.)
        report["ok"] &= _p95(meanwhile) - _p95(before) < 5.0
    return report


def test_a_heavy_shap_request_does_not_delay_light_ones(slow: str, tmp_path: Path) -> None:
    """1,000 records with TreeSHAP reasons, sent from another process, twice in each of two
    rounds; meanwhile /healthz and a single-record /v1/predict are timed in a loop and compared
    with their usual time, measured just before each round. The test machine may be busy with
    other work that comes and goes: up to three attempts, and none when its load average is over
    BUSY_LOAD_PER_CORE. (With the heavy requests scored on the event loop, the probes waited
    ~200 ms: no attempt could pass.)"""
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > BUSY_LOAD_PER_CORE * cores:
        pytest.skip(
            f"machine too busy to time requests: load {os.getloadavg()[0]:.1f}, {cores} cores"
        )
    heavy = tmp_path / "heavy.json"
    heavy.write_text(json.dumps({"records": sample_records(1000)}))
    single = json.dumps({"records": [FORM_DEFAULTS | {"sku": "probe"}]}).encode()
    reports = []
    with httpx.Client(timeout=30) as client:
        for _ in range(20):  # warm the connection and the server's first-request paths
            _probe(client, slow, single)
        for _ in range(3):
            reports.append(_rounds(client, slow, heavy, single))
            if reports[-1]["ok"]:
                break
    print("\nlight requests while heavy ones were scored:", *reports, sep="\n")
    assert reports[-1]["ok"], reports
    assert_still_healthy(slow)


# -- uploads at once, and uploads that take too long -----------------------------------------------
def test_a_busy_server_says_so_and_an_overdue_upload_is_stopped(slow: str) -> None:
    """One upload at a time: a second is refused with 429 and Retry-After while the first runs.
    The first (100,000 rows with TreeSHAP reasons, ~15 s of work) runs past the time limit: 504,
    its worker is replaced, and uploads work again."""
    big = gzip.compress(HEADER + b"".join(ROWS) * 10, compresslevel=1)
    with ThreadPoolExecutor(1) as background:
        for _ in range(3):  # the big upload must come first; if the small one won, again
            pending = background.submit(upload, slow, "big.csv.gz", big)
            time.sleep(0.3)  # its request has started (and taken the worker) by now
            busy = upload(slow, "small.csv", small_csv())
            overdue = pending.result()
            if overdue.status_code != 429:
                break
    assert busy.status_code == 429, upload_error(busy)
    assert int(busy.headers["retry-after"]) > 0
    assert "(upload_concurrency = 1); try again" in upload_error(busy)
    assert overdue.status_code == 504
    assert (
        f"big.csv.gz: not scored within the time limit of {UPLOAD_SECONDS:g} s "
        "(upload_timeout_seconds)" in upload_error(overdue)
    )
    assert_still_healthy(slow)
    # The killed worker's replacement starts; until it is ready, uploads are refused as busy.
    # (On a machine busy with other work even 50 rows may take longer than the limit: again.)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        response = upload(slow, "small.csv", small_csv())
        if response.status_code not in {429, 504}:
            break
        time.sleep(1)
    assert response.status_code == 200, upload_error(response)
    assert response.headers["x-rows-scored"] == "50"
    assert_still_healthy(slow)
