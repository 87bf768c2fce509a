"""Attacks on identity, against a real `backorder serve` over HTTP.

Each case asserts the status code, a clear message, and that the server is still healthy after.
Keys are made and revoked with the real `backorder keys` command while the server runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from backorder.web import FORM_DEFAULTS
from tests.conftest import run_cli
from tests.support.keys import bearer
from tests.support.servers import HOST, free_port, serving, wait_until

if TYPE_CHECKING:
    from typing import IO

BODY = {"records": [FORM_DEFAULTS]}


@dataclass(frozen=True)
class Server:
    url: str
    home: Path
    keys: dict[str, str]  # role -> token

    def healthy(self) -> None:
        assert httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200


def new_key(home: Path, name: str, role: str) -> str:
    made = run_cli("keys", "create", name, "--role", role, home=home)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("attack-auth")
    home = tmp / "home"
    shutil.copytree(trained_home, home)
    keys = {role: new_key(home, f"k-{role}", role) for role in ("viewer", "planner", "metrics")}
    with serving(home, tmp / "serve.log") as url:
        yield Server(url, home, keys)


def test_no_key_and_a_wrong_key_are_401_with_a_challenge(server: Server) -> None:
    for headers in ({}, bearer("bo_guessed"), {"Authorization": "Bearer"}, {"Authorization": "x"}):
        answer = httpx.post(f"{server.url}/v1/predict", json=BODY, headers=headers)
        assert answer.status_code == 401, headers
        assert answer.headers["www-authenticate"] == 'Bearer realm="backorder"'
        assert "not signed in" in answer.json()["detail"]
    for path in ("/v1/model", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
    # A browser is sent to the sign-in screen instead.
    page = httpx.get(server.url, headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/signin"
    server.healthy()


def test_a_wrong_role_is_403_and_says_what_is_needed(server: Server) -> None:
    viewer, metrics = bearer(server.keys["viewer"]), bearer(server.keys["metrics"])
    upload = httpx.post(
        f"{server.url}/upload",
        files={"file": ("b.csv", b"sku\n1\n", "text/csv")},
        headers=viewer,
    )
    assert upload.status_code == 403 and "needs planner" in upload.json()["detail"]
    scrape = httpx.get(f"{server.url}/metrics", headers=viewer)
    assert scrape.status_code == 403 and "needs metrics" in scrape.json()["detail"]
    predict = httpx.post(f"{server.url}/v1/predict", json=BODY, headers=metrics)
    assert predict.status_code == 403 and "needs viewer" in predict.json()["detail"]
    assert httpx.get(f"{server.url}/metrics", headers=metrics).status_code == 200
    assert httpx.post(f"{server.url}/v1/predict", json=BODY, headers=viewer).status_code == 200
    server.healthy()


def test_a_revoked_key_is_refused_within_two_seconds_without_a_restart(server: Server) -> None:
    token = new_key(server.home, "short-lived", "planner")
    deadline = time.monotonic() + 3
    while httpx.get(f"{server.url}/v1/model", headers=bearer(token)).status_code != 200:
        assert time.monotonic() < deadline, "a new key is not accepted within 3 s"
        time.sleep(0.1)
    listed = run_cli("keys", "list", home=server.home)
    assert "short-lived" in listed.stdout and token not in listed.stdout
    revoked = run_cli("keys", "revoke", "short-lived", home=server.home)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    while httpx.get(f"{server.url}/v1/model", headers=bearer(token)).status_code == 200:
        assert time.monotonic() - started < 2.5, "revoked key still accepted"
        time.sleep(0.05)
    refused = httpx.get(f"{server.url}/v1/model", headers=bearer(token))
    assert refused.status_code == 401
    server.healthy()


def test_forms_without_their_csrf_token_are_refused(server: Server) -> None:
    with httpx.Client(base_url=server.url, follow_redirects=False) as browser:
        signin = browser.get("/signin")
        form_token = re.search(r'name="csrf_token" value="([^"]+)"', signin.text)
        assert form_token
        # Signing in needs the sign-in form's token (login CSRF).
        forged_signin = browser.post("/signin", data={"key": server.keys["planner"]})
        assert forged_signin.status_code == 403 and "form expired" in forged_signin.text
        started = browser.post(
            "/signin", data={"key": server.keys["planner"], "csrf_token": form_token.group(1)}
        )
        assert started.status_code == 303
        values = {k: str(v) for k, v in FORM_DEFAULTS.items()}
        forged = browser.post("/", data=values)
        assert forged.status_code == 403 and "CSRF" in forged.json()["detail"]
        upload = browser.post("/upload", files={"file": ("b.csv", b"sku\n1\n", "text/csv")})
        assert upload.status_code == 403 and "CSRF" in upload.json()["detail"]
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/").text)
        assert token
        scored = browser.post("/", data={**values, "csrf_token": token.group(1)})
        assert scored.status_code == 200 and 'id="probability"' in scored.text
    server.healthy()


def test_a_forged_proxy_header_from_an_untrusted_address_is_ignored(
    trained_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    who = {"X-Forwarded-Email": "mallory@example.com", "X-Forwarded-Groups": "planning"}
    proxy = {"BACKORDER_AUTH": "proxy", "BACKORDER_PROXY_GROUP_ROLES": '{"planning": "admin"}'}
    # The proxy is some other machine: the header from this test's address is a forgery.
    untrusted = {**proxy, "BACKORDER_TRUSTED_PROXIES": '["10.99.0.1"]'}
    with serving(home, tmp_path / "untrusted.log", env=untrusted) as url:
        forged = httpx.post(f"{url}/v1/predict", json=BODY, headers=who)
        assert forged.status_code == 401 and "proxy did not identify you" in forged.json()["detail"]
        assert httpx.get(f"{url}/metrics", headers=who).status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200
    # The same header from a trusted proxy address (loopback here) identifies the person.
    with serving(home, tmp_path / "trusted.log", env=proxy) as url:
        answer = httpx.post(f"{url}/v1/predict", json=BODY, headers=who)
        assert answer.status_code == 200
        nobody = httpx.post(
            f"{url}/v1/predict",
            json=BODY,
            headers={"X-Forwarded-Email": "eve@example.com", "X-Forwarded-Groups": "guests"},
        )
        assert nobody.status_code == 403 and "no role" in nobody.json()["detail"]
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_the_rate_limit_answers_429_with_retry_after(trained_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    token = new_key(home, "busy", "viewer")
    with serving(
        home, tmp_path / "serve.log", env={"BACKORDER_RATE_LIMIT_PER_MINUTE": "20"}
    ) as url:
        codes = [httpx.get(f"{url}/v1/model", headers=bearer(token)).status_code for _ in range(25)]
        # 20 at once, then 429s (a slow machine may refill one token every 3 s meanwhile).
        assert codes[:20] == [200] * 20 and codes[20:].count(429) >= 3, codes
        over = httpx.get(f"{url}/v1/model", headers=bearer(token))
        assert over.status_code == 429 and "rate limit" in over.json()["detail"]
        assert 1 <= int(over.headers["retry-after"]) <= 5
        # Another key, and the probes, are not slowed by it.
        other = new_key(home, "calm", "viewer")
        deadline = time.monotonic() + 3
        while httpx.get(f"{url}/v1/model", headers=bearer(other)).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_auth_none_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    refused = run_cli(
        "serve", "--host", "0.0.0.0", home=tmp_path / "home", env={"BACKORDER_AUTH": "none"}
    )
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth: none is only allowed on loopback" in lines[0], lines


def test_a_first_serve_on_loopback_makes_an_admin_key_and_says_how_to_sign_in(
    trained_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    port = free_port()
    exe = str(Path(sys.executable).with_name("backorder"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")}
    env["BACKORDER_HOME"] = str(home)
    proc = subprocess.Popen(
        [exe, "serve", "--host", HOST, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first, token = read_lines(proc.stdout, 2, timeout=60)
        assert f"Open http://{HOST}:{port}" in first and "local-admin" in first
        url = f"http://{HOST}:{port}"
        wait_until(lambda: httpx.get(f"{url}/readyz").raise_for_status(), "serve", 60)
        assert httpx.get(f"{url}/metrics", headers=bearer(token)).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def read_lines(stream: IO[str], n: int, timeout: float) -> list[str]:
    """The first `n` lines of a child's stdout, or fail after `timeout` (never hang)."""
    lines: list[str] = []

    def read() -> None:
        for line in stream:
            lines.append(line.strip())
            if len(lines) == n:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert len(lines) >= n, f"only {lines!r} within {timeout:.0f} s"
    return lines[:n]
