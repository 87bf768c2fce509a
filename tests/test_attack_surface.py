"""What a browser or a stranger can do to a real `backorder serve` on loopback: every answer
carries the security headers, a forged Host header is refused (DNS rebinding), the API docs
come from the app or not at all, and a real browser reports no Content-Security-Policy
violation while the page and the docs are used."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from backorder.web import FORM_DEFAULTS
from tests.support.servers import serving
from tests.test_live_server import CHROMIUM, CHROMIUM_ARGS

NO_AUTH = {"BACKORDER_AUTH": "none"}
JSON = {"content-type": "application/json"}
# The second server: no API docs, and reached only by the names an operator listed.
CONFIGURED = NO_AUTH | {
    "BACKORDER_API_DOCS": "false",
    "BACKORDER_TRUSTED_HOSTS": json.dumps(["127.0.0.1", "backorder.example.com", "*.corp.example"]),
}


@pytest.fixture(scope="module")
def server(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Default settings: API docs on, loopback names trusted."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(trained_home, log, env=NO_AUTH) as url:
        yield url


@pytest.fixture(scope="module")
def configured(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(trained_home, log, env=CONFIGURED) as url:
        yield url


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def assert_security_headers(response: httpx.Response) -> None:
    what = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    csp = response.headers.get("content-security-policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, what
    assert directives.get("default-src") == ["'none'"], what
    assert directives.get("script-src") == ["'self'"], what
    assert directives.get("style-src") == ["'self'"], what
    assert directives.get("frame-ancestors") == ["'none'"], what
    assert directives.get("base-uri") == ["'none'"], what
    assert directives.get("form-action") == ["'self'"], what
    assert directives.get("object-src") == ["'none'"], what
    assert response.headers.get("x-content-type-options") == "nosniff", what
    assert response.headers.get("referrer-policy") == "no-referrer", what
    assert response.headers.get("x-frame-options") == "DENY", what
    # Plain HTTP: HSTS would be ignored, and on loopback it would pin every port to https.
    assert "strict-transport-security" not in response.headers, what


def test_every_answer_carries_the_security_headers(server: str) -> None:
    record = {"sku": "1", **FORM_DEFAULTS}
    too_big = b'{"records": [' + b" " * (2 << 20) + b"]}"

    def streamed() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        for _ in range(40):
            yield b" " * (64 << 10)

    with httpx.Client(base_url=server, timeout=30) as client:
        answers = [
            client.get("/"),
            client.post("/", data={k: str(v) for k, v in FORM_DEFAULTS.items()}),
            client.post("/", data={**FORM_DEFAULTS, "lead_time": "-2"}),  # 422, the page
            client.post("/v1/predict", json={"records": [record]}),
            client.post("/v1/predict", json={"records": [record | {"lead_time": -1}]}),  # 422
            client.post("/v1/predict", content=b"{not json", headers=JSON),  # 422
            client.post("/v1/predict", content=too_big, headers=JSON),  # 413, declared
            client.post("/v1/predict", content=streamed(), headers=JSON),  # 413, streamed
            client.get("/v1/model"),
            client.delete("/v1/model"),  # 405
            client.get("/no/such/page"),  # 404
            client.get("/healthz"),
            client.get("/readyz"),
            client.get("/metrics"),
            client.get("/docs"),
            client.get("/openapi.json"),
            client.get("/static/app.css"),
            client.get("/static/docs.js"),
            client.get("/static/swagger/swagger-ui-bundle.js"),
            client.get("/static/nothing.css"),  # 404 from the static files
            client.get("/healthz", headers={"host": "evil.example"}),  # 400
        ]
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 400, 404, 405, 413, 422], statuses
    for answer in answers:
        assert_security_headers(answer)
    # The static files are what they claim to be (nosniff makes a wrong type fatal).
    types = {a.request.url.path: a.headers.get("content-type", "") for a in answers}
    assert types["/static/app.css"].startswith("text/css")
    assert types["/static/docs.js"].startswith(("text/javascript", "application/javascript"))


def test_hsts_only_for_answers_sent_over_tls(server: str) -> None:
    """A TLS-terminating proxy on loopback (a trusted proxy by default) says the request came
    over https: then, and only then, the answer asks the browser to stay on https."""
    with httpx.Client(base_url=server, timeout=10) as client:
        over_tls = client.get("/healthz", headers={"x-forwarded-proto": "https"})
        plain = client.get("/healthz")
    assert over_tls.headers.get("strict-transport-security", "").startswith("max-age=")
    assert "strict-transport-security" not in plain.headers
    assert over_tls.headers["content-security-policy"] == plain.headers["content-security-policy"]


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "127.0.0.2:{port}",
        "127.0.0.1:notaport",
        "",
    ],
)
def test_a_forged_host_is_refused_with_a_clear_message(server: str, host: str) -> None:
    given = host.format(port=port_of(server))
    response = httpx.get(f"{server}/healthz", headers={"host": given}, timeout=10)
    assert response.status_code == 400, given
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert "\n" not in detail and "trusted_hosts" in detail
    assert f"host {given!r} is not served here" in detail


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "[::1]:{port}", "localhost"],
)
def test_the_loopback_names_are_served(server: str, host: str) -> None:
    response = httpx.get(
        f"{server}/healthz", headers={"host": host.format(port=port_of(server))}, timeout=10
    )
    assert response.status_code == 200, response.text


def test_a_request_without_host_is_refused_and_refusals_are_counted(server: str) -> None:
    """HTTP/1.0 may leave the Host header out; nothing then says which name was asked for."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-security-policy:" in head.lower()
    assert "without a Host header" in json.loads(body)["detail"]
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    refused = re.search(
        r'backorder_http_requests_total\{method="GET",route="unmatched",status="400"\} (\S+)',
        metrics,
    )
    assert refused and float(refused.group(1)) >= 1, "refusals are not counted"


def test_trusted_hosts_setting_names_the_hosts(configured: str) -> None:
    port = port_of(configured)

    def status(host: str) -> int:
        return httpx.get(f"{configured}/healthz", headers={"host": host}, timeout=10).status_code

    assert status(f"backorder.example.com:{port}") == 200
    assert status("backorder.example.com") == 200
    assert status("app.corp.example") == 200
    assert status(f"127.0.0.1:{port}") == 200
    assert status("corp.example") == 400  # *.corp.example: subdomains only
    assert status(f"localhost:{port}") == 400  # not listed any more
    assert status("backorder.example.com.evil.example") == 400


def test_api_docs_are_served_by_the_app(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as client:
        docs = client.get("/docs")
        schema = client.get("/openapi.json")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert schema.status_code == 200 and "/v1/predict" in schema.json()["paths"]
        assert client.get("/redoc").status_code == 404  # not hosted, so not offered
        # Every asset the page names is the app's own, and answers.
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert sorted(assets) == [
            "/static/docs.js",
            "/static/swagger/swagger-ui-bundle.js",
            "/static/swagger/swagger-ui.css",
        ]
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
        init = client.get("/static/docs.js").text
    assert 'data-openapi-url="/openapi.json"' in docs.text
    for text in (docs.text, init):
        assert not re.search(r"https?://", text), "the docs page names an outside URL"
        assert "<script>" not in text and "style=" not in text


def test_api_docs_can_be_turned_off(configured: str) -> None:
    with httpx.Client(base_url=configured, timeout=10) as client:
        for path in ("/docs", "/openapi.json", "/redoc"):
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert_security_headers(answer)
        assert client.get("/healthz").status_code == 200  # the rest is served as before


def test_page_and_docs_raise_no_csp_violation_in_a_real_browser(server: str) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    violations: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        # Chromium reports each violation both as an event and on the console.

        def record(text: str) -> None:  # a def: Playwright cannot wrap a builtin like .append
            violations.append(text)

        page.expose_function("reportViolation", record)
        page.add_init_script(
            "document.addEventListener('securitypolicyviolation', e =>"
            " window.reportViolation(`${e.violatedDirective} ${e.blockedURI}`));"
        )
        page.on(
            "console",
            lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.goto(server)
        # The stylesheet applies (a file, allowed by the policy).
        assert page.eval_on_selector("header", "e => getComputedStyle(e).color") == (
            "rgb(255, 255, 255)"
        )
        page.fill("#national_inv", "2")
        page.fill("#forecast_3_month", "120")
        page.click("#predict")
        page.wait_for_selector("#probability")
        page.fill("#in_transit_qty", "200")
        page.click("#predict")
        page.wait_for_selector("#whatif")
        # Each reason's bar is drawn to its share: the largest one spans the whole width.
        widths = [box["width"] for box in _boxes(page, ".bar rect")]
        full = _boxes(page, ".bar")[0]["width"]
        assert len(widths) == 3 and max(widths) == pytest.approx(full, abs=1)
        assert min(widths) < full

        page.goto(f"{server}/docs")
        page.wait_for_selector(".opblock-summary-path")
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/v1/predict" in paths and "/v1/model" in paths
        # Call the API from the docs: the fetch is checked by connect-src.
        model = page.locator('.opblock:has(.opblock-summary-path[data-path="/v1/model"])')
        model.locator(".opblock-summary").click()
        model.locator("button.try-out__btn").click()
        model.locator("button.execute").click()
        answered = model.locator(".live-responses-table tr.response .response-col_status").first
        answered.wait_for()
        assert answered.inner_text().strip().startswith("200"), answered.inner_text()
        assert not violations, violations

        # The recorder does see a violation: an inline style, which the policy refuses.
        directive = page.evaluate(
            """() => new Promise(resolve => {
                document.addEventListener(
                    'securitypolicyviolation', e => resolve(e.violatedDirective), {once: true});
                const style = document.createElement('style');
                style.textContent = 'body { color: red }';
                document.head.append(style);
            })"""
        )
        assert directive.startswith("style-src"), directive
        for _ in range(50):  # the report reaches Python through a binding, a moment later
            if violations:
                break
            page.wait_for_timeout(100)
        browser.close()
    assert violations, "the violation recorder saw nothing"


def _boxes(page: Any, selector: str) -> list[dict[str, float]]:
    locator = page.locator(selector)
    return [locator.nth(i).bounding_box() for i in range(locator.count())]
