"""`backorder serve` as a real process on loopback: a real browser, and fuzzing from OpenAPI."""

from __future__ import annotations

import itertools
import os
import shutil
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import SAMPLE
from tests.support.keys import bearer, make_key
from tests.support.servers import serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class Live:
    url: str
    planner: str  # an API key of role planner
    admin: str


@pytest.fixture(scope="module")
def live_server(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("serve")
    home, log = tmp / "home", tmp / "serve.log"
    shutil.copytree(trained_home, home)
    keys = Live("", make_key(home, "planner", "ana"), make_key(home, "admin", "ops"))
    # The fuzzer sends hundreds of requests a minute: lift the rate limit for it.
    with serving(home, log, env={"BACKORDER_RATE_LIMIT_PER_MINUTE": "1000000"}) as url:
        yield Live(url, keys.planner, keys.admin)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), lines[:5]  # JSON logs only


def test_browser_signs_in_scores_uploads_and_signs_out(
    live_server: Live, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(live_server.url)
        page.wait_for_selector("#signin-form")  # not signed in: the sign-in screen
        page.fill("#key", "not-a-key")
        page.click("#signin")
        assert "Unknown or revoked key" in page.inner_text("#signin-error")
        page.fill("#key", live_server.planner)
        page.click("#signin")
        page.wait_for_selector("#sku-form")
        assert "ana" in page.inner_text("#who")
        page.fill("#sku", "3285000")
        page.fill("#national_inv", "2")
        page.fill("#forecast_3_month", "120")
        page.fill("#sales_3_month", "90")
        page.select_option("#deck_risk", "Yes")
        page.click("#predict")
        page.wait_for_selector("#probability")
        first = float(page.inner_text("#probability").rstrip(" %"))
        assert 0 <= first <= 100
        assert page.inner_text("#risk-band") in {"low", "medium", "high"}
        assert page.locator(".reason").count() == 3
        # What-if: 200 more units arrive.
        page.fill("#in_transit_qty", "200")
        page.click("#predict")
        page.wait_for_selector("#whatif")
        assert "units in transit: 0 → 200" in page.inner_text("#whatif")
        second = float(page.inner_text("#probability").rstrip(" %"))
        assert second != first
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        target = os.environ.get("SAVE_SCREENSHOT")  # `make screenshot` keeps it for the docs
        if target:
            shutil.copy(shot, target)
        # A small batch through the upload form: the answer is a zip of scored rows.
        with page.expect_download() as download_info:
            page.set_input_files("#upload-form input[type=file]", str(SAMPLE / "new_batch.csv.gz"))
            page.click("#upload")
        download = download_info.value
        assert download.suggested_filename == "new_batch-scored.zip"
        with zipfile.ZipFile(download.path()) as archive:
            assert {"predictions.csv", "rejects.csv", "summary.txt"} <= set(archive.namelist())
        # Sign out: the session ends, and the page asks for a key again.
        page.click("#signout")
        page.wait_for_selector("#signin-form")
        page.goto(live_server.url)
        page.wait_for_selector("#signin-form")
        browser.close()


def test_fuzzed_requests_never_cause_a_server_error(live_server: Live) -> None:
    """Every operation in the OpenAPI schema, fuzzed with valid and invalid bodies: no 5xx, and
    every documented response matches its schema. (Driven from a plain test because
    schemathesis' pytest fixture loader does not support pytest 9 yet.)"""
    headers = bearer(live_server.admin)
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/model", "/healthz", "/metrics"}
    statuses: Counter[int] = Counter()
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to get wrong in a parameterless GET

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            response = case.call(headers=headers)
            statuses[response.status_code] += 1
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance]
            )

        check()
    assert statuses[200] >= 20 and statuses[422] >= 20, statuses  # valid and invalid bodies
    assert not [s for s in statuses if s >= 500]
