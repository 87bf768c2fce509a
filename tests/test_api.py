"""The HTTP API and the page, in process (FastAPI's TestClient runs the real ASGI app)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from backorder.api_schema import SkuRecord, records_frame
from backorder.config import Settings
from backorder.contract import FEATURE_COLUMNS, FLAG_COLUMNS, validate_chunk
from backorder.logs import JsonFormatter
from backorder.predict import score_rows
from backorder.registry import Registry
from backorder.web import FORM_DEFAULTS, create_app
from tests.conftest import SAMPLE, make_settings
from tests.support.keys import bearer, make_key, signed_in_client


@pytest.fixture
def client(trained_settings: Settings) -> Any:
    with signed_in_client(trained_settings) as test_client:
        yield test_client


def sample_records(n: int) -> list[dict[str, Any]]:
    raw = pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False).head(n)
    records = []
    for _, row in raw.iterrows():
        record: dict[str, Any] = {"sku": row["sku"]}
        for name in FEATURE_COLUMNS:
            value = row[name]
            record[name] = value if name in FLAG_COLUMNS else (float(value) if value else None)
        records.append(record)
    return records


def test_predict_scores_like_the_batch_path(client: TestClient, trained_settings: Settings) -> None:
    records = sample_records(50)
    response = client.post("/v1/predict", json={"records": records})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1"
    assert len(body["predictions"]) == 50
    model = Registry(trained_settings).load("champion")
    batch = score_rows(model, records_frame([SkuRecord(**r) for r in records]), trained_settings)
    got = np.array([p["backorder_probability"] for p in body["predictions"]])
    np.testing.assert_allclose(got, batch["backorder_probability"].to_numpy(), rtol=1e-9)
    for p in body["predictions"]:
        assert p["will_backorder"] == (p["backorder_probability"] >= body["threshold"])
        assert p["risk_band"] in {"low", "medium", "high"}
        assert len(p["reasons"]) == 3
        sizes = [abs(r["contribution"]) for r in p["reasons"]]
        assert sizes == sorted(sizes, reverse=True)
        assert all(r["text"].endswith("risk") for r in p["reasons"])
    assert [p["sku"] for p in body["predictions"]] == [r["sku"] for r in records]


def test_api_and_batch_contract_accept_and_reject_the_same_rows() -> None:
    """The API checks records with pydantic for speed; it must agree with the batch contract."""
    good = sample_records(40)
    cases = [
        {"lead_time": -3.0},
        {"perf_6_month_avg": 1.5},
        {"perf_12_month_avg": -99.0},  # the sentinel is allowed
        {"perf_6_month_avg": None},
        {"lead_time": None},
        {"national_inv": None},
        {"deck_risk": "maybe"},
        {"national_inv": -25.0},  # units owed: allowed
        {"in_transit_qty": float("inf")},
    ]
    records = good + [good[i] | change for i, change in enumerate(cases)]
    raw = pd.DataFrame(records, index=pd.RangeIndex(1, len(records) + 1)).astype(object)
    checked = validate_chunk(raw, require_label=False)
    accepted_by_batch = set(checked.rows.index)
    accepted_by_api = set()
    for number, record in enumerate(records, start=1):
        try:
            SkuRecord(**record)
            accepted_by_api.add(number)
        except ValidationError:
            pass
    assert accepted_by_api == accepted_by_batch
    assert len(accepted_by_api) == len(records) - 5
    api_rows = records_frame([SkuRecord(**records[i - 1]) for i in sorted(accepted_by_api)])
    pd.testing.assert_frame_equal(
        api_rows[list(FEATURE_COLUMNS)].reset_index(drop=True),
        checked.rows[list(FEATURE_COLUMNS)].reset_index(drop=True),
    )


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"records": [FORM_DEFAULTS | {"lead_time": -3}]}, ["body", "records", 0, "lead_time"]),
        ({"records": [FORM_DEFAULTS | {"perf_6_month_avg": 7}]}, ["body", "records", 0]),
        ({"records": [FORM_DEFAULTS | {"rev_stop": "maybe"}]}, ["body", "records", 0, "rev_stop"]),
        ({"records": [FORM_DEFAULTS | {"colour": "red"}]}, ["body", "records", 0, "colour"]),
        ({"records": [{k: v for k, v in FORM_DEFAULTS.items() if k != "national_inv"}]}, None),
        ({"records": []}, ["body", "records"]),
        ({"records": [FORM_DEFAULTS] * 1001}, ["body", "records"]),
        ({"rows": [FORM_DEFAULTS]}, None),
    ],
)
def test_invalid_input_is_422_with_the_field(
    client: TestClient, body: dict[str, Any], where: list[Any] | None
) -> None:
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail and all("msg" in d for d in detail)
    if where is not None:
        assert any(d["loc"][: len(where)] == where for d in detail), detail


def test_malformed_and_oversized_bodies(client: TestClient) -> None:
    assert (
        client.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    huge = b'{"records": [' + b" " * (2 << 20) + b"]}"
    response = client.post(
        "/v1/predict", content=huge, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]


def test_model_health_and_metrics(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert info["version"] == "1" and "champion" in info["aliases"]
    assert info["features"] == list(FEATURE_COLUMNS)
    assert 0 < info["threshold"] < 1 and info["validation"]["roc_auc"] > 0.8
    assert info["trained_at"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 200
    client.post("/v1/predict", json={"records": sample_records(20)})
    client.post("/v1/predict", json={"records": [FORM_DEFAULTS | {"lead_time": -1}]})
    text = client.get("/metrics").text
    labels = f'ref="champion",scoring_engine="{info["scoring_engine"]}",version="1"'
    assert f"backorder_model_info{{{labels}}} 1.0" in text
    assert 'backorder_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'status="422"' in text
    assert 'backorder_rejected_inputs_total{source="api"} 1.0' in text
    decisions = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("backorder_predictions_total")
    }
    assert sum(decisions.values()) == 20
    assert "backorder_predicted_probability_bucket" in text
    assert (
        'backorder_http_request_duration_seconds_count{method="POST",route="/v1/predict",'
        'status="422"} 1.0' in text
    )


def test_requests_are_logged_as_json_with_a_request_id(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="backorder.serve"):
        response = client.get("/healthz", headers={"x-request-id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    record = next(r for r in caplog.records if r.getMessage() == "request")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "abc123" and line["status"] == 200
    assert line["route"] == "/healthz" and line["duration_ms"] >= 0
    assert line["model_version"] == client.get("/v1/model").json()["version"]
    coloured = logging.makeLogRecord({"msg": "started", "color_message": "\x1b[36mstarted"})
    assert "color_message" not in json.loads(JsonFormatter().format(coloured))


def test_page_form_and_what_if(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.text.count("<input id=") + page.text.count("<select id=") == 22  # sku + 21
    assert "http://" not in page.text and "https://" not in page.text  # no CDN assets
    first = client.post("/", data={k: str(v) for k, v in FORM_DEFAULTS.items()})
    assert first.status_code == 200 and 'id="probability"' in first.text
    assert 'name="previous_probability"' in first.text
    previous = first.text.split('name="previous_probability" value="')[1].split('"')[0]
    risky = FORM_DEFAULTS | {"national_inv": 0, "forecast_3_month": 300, "sales_3_month": 250}
    second = client.post(
        "/",
        data={k: str(v) for k, v in risky.items()}
        | {
            "previous_probability": previous,
            "previous_values": json.dumps({k: str(v) for k, v in FORM_DEFAULTS.items()}),
        },
    )
    assert 'id="whatif"' in second.text
    assert "3-month forecast: 0 → 300" in second.text
    bad = client.post(
        "/", data={k: str(v) for k, v in (FORM_DEFAULTS | {"lead_time": "-2"}).items()}
    )
    assert bad.status_code == 422 and "greater than or equal to 0" in bad.text


def test_upload_scores_through_the_batch_path(client: TestClient) -> None:
    payload = (SAMPLE / "new_batch.csv.gz").read_bytes()
    response = client.post(
        "/upload", files={"file": ("new_batch.csv.gz", payload, "application/gzip")}
    )
    assert response.status_code == 200, response.text[:300]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    predictions = pd.read_csv(archive.open("predictions.csv"))
    rejects = pd.read_csv(archive.open("rejects.csv"))
    assert len(predictions) == 10_000 and len(rejects) == 1  # the "(10000 rows)" footer line
    assert response.headers["x-rows-read"] == "10001"
    broken = client.post("/upload", files={"file": ("x.csv", b"a,b\n1,2\n", "text/csv")})
    assert broken.status_code == 422
    assert "x.csv: the header has none of the expected columns" in broken.text
    assert "backorder-upload-" not in broken.text


def test_new_champion_is_picked_up_while_requests_are_in_flight(tmp_path: Path) -> None:
    """Requests keep succeeding while a newly promoted model is loaded and swapped in."""
    from backorder.train import run_training

    home = tmp_path / "home"
    # Four threads hammer as fast as they can: no rate limit here (it has tests of its own).
    settings = make_settings(home, serve_reload_seconds=0.2, rate_limit_per_minute=0)
    run_training([SAMPLE / "labelled.csv.gz"], settings, home / "v1")
    statuses: Counter[int] = Counter()
    versions: list[str] = []
    stop = threading.Event()
    records = {"records": sample_records(5)}

    with signed_in_client(settings) as test_client:

        def hammer() -> None:
            while not stop.is_set():
                response = test_client.post("/v1/predict", json=records)
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    versions.append(response.json()["model_version"])

        workers = [threading.Thread(target=hammer) for _ in range(4)]
        for w in workers:
            w.start()
        second = run_training(
            [SAMPLE / "labelled.csv.gz"], make_settings(home, random_seed=7), home / "v2"
        )
        Registry(settings).promote(second.version)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not versions or versions[-1] != second.version):
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join()
        assert test_client.get("/v1/model").json()["version"] == second.version
    assert set(statuses) == {200}, statuses
    assert versions[0] == "1" and versions[-1] == second.version
    # Responses from 4 threads finish out of order around the swap; well after it, only the
    # new model answers.
    assert set(versions[-20:]) == {second.version}


def test_a_fresh_stack_waits_for_the_first_champion(tmp_path: Path) -> None:
    from backorder.errors import ModelNotFoundError
    from backorder.train import run_training

    empty = make_settings(tmp_path / "home")
    with pytest.raises(ModelNotFoundError), signed_in_client(empty):
        pass  # by default a missing model stops the server at start-up
    waiting = make_settings(tmp_path / "home", serve_wait_for_model=True, serve_reload_seconds=0.2)
    with signed_in_client(waiting) as client:
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/predict", json={"records": sample_records(1)}).status_code == 503
        run_training([SAMPLE / "labelled.csv.gz"], waiting, tmp_path / "training")
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["model_version"] == "1"
        answer = client.post("/v1/predict", json={"records": sample_records(1)})
        assert answer.status_code == 200
        # Waiting is not failing: no reload failure was counted.
        assert "backorder_model_reload_failures_total 0.0" in client.get("/metrics").text


def test_only_trusted_hosts_are_answered_in_process(trained_settings: Settings) -> None:
    """TestClient's default Host, "testserver", is not a loopback name: refused like any other."""
    with TestClient(create_app(trained_settings)) as stranger:
        refused = stranger.get("/healthz")
    assert refused.status_code == 400
    assert "'testserver' is not served here" in refused.json()["detail"]
    assert refused.headers["x-content-type-options"] == "nosniff"
    anywhere = trained_settings.model_copy(update={"trusted_hosts": ["*"]})
    with TestClient(create_app(anywhere)) as stranger:
        assert stranger.get("/healthz").status_code == 200


def test_an_unhandled_error_is_a_500_with_the_security_headers(trained_settings: Settings) -> None:
    """A fault no request can cause for real: a route that raises."""
    app = create_app(trained_settings)

    def broken() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/broken", broken)
    headers = bearer(make_key(trained_settings, "viewer"))
    with TestClient(app, base_url="http://127.0.0.1", headers=headers) as test_client:
        response = test_client.get("/broken")
    assert response.status_code == 500 and response.json()["detail"] == "internal error"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("new_batch.csv.gz", 'attachment; filename="new_batch-scored.zip"'),
        (
            "прогноз.csv",
            "attachment; filename=\"batch-scored.zip\"; filename*=UTF-8''"
            "%D0%BF%D1%80%D0%BE%D0%B3%D0%BD%D0%BE%D0%B7-scored.zip",
        ),
        (
            'a"b\\c.csv',
            "attachment; filename=\"a_b_c-scored.zip\"; filename*=UTF-8''a%22b%5Cc-scored.zip",
        ),
        (".hidden.csv", 'attachment; filename="batch-scored.zip"'),
    ],
)
def test_the_download_is_named_after_the_upload(name: str, header: str) -> None:
    from backorder.web.uploads import download_disposition

    assert download_disposition(name) == header


@pytest.mark.parametrize(
    ("given", "name"),
    [("batch.csv", "batch.csv"), ("C:\\data\\batch.csv", "batch.csv"), ("../../x.csv", "x.csv")],
)
def test_an_upload_name_is_its_last_path_part(given: str, name: str) -> None:
    from backorder.web.uploads import upload_name

    assert upload_name(given) == name


@pytest.mark.parametrize("given", [None, "", " ", ".", "..", "a/", "a\x00b.csv", "x" * 256])
def test_unusable_upload_names_are_refused(given: str | None) -> None:
    from backorder.web.uploads import upload_name

    with pytest.raises(ValueError, match=r"file|choose"):
        upload_name(given)


def test_chunked_bodies_over_the_limit_are_413(client: TestClient) -> None:
    """Without Content-Length the body is counted as it arrives; the form parser must not turn
    the refusal into a 400."""

    def chunks(head: bytes, size: int) -> Any:
        yield head
        for _ in range(size // (64 << 10)):
            yield b"7" * (64 << 10)

    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n'
    for path, content_type, first, size in [
        ("/upload", "multipart/form-data; boundary=b", head, 11 << 20),
        ("/v1/predict", "application/json", b'{"records": [', 2 << 20),
    ]:
        response = client.post(
            path, content=chunks(first, size), headers={"content-type": content_type}
        )
        assert response.status_code == 413, (path, response.text[:200])
        assert "larger than" in response.json()["detail"]


def test_edited_what_if_fields_are_ignored(client: TestClient) -> None:
    form = {k: str(v) for k, v in FORM_DEFAULTS.items()}
    for hidden in [
        {"previous_values": "[]", "previous_probability": "0.2"},
        {"previous_values": "5", "previous_probability": "0.2"},
        {"previous_values": "{}", "previous_probability": "abc"},
        {"previous_values": "{}", "previous_probability": "nan"},
    ]:
        response = client.post("/", data=form | hidden)
        assert response.status_code == 200 and 'id="probability"' in response.text
        assert 'id="whatif"' not in response.text
