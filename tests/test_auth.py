"""Identity and roles, in process: keys, sessions with CSRF, the proxy mode, rate limits.

The real-server attacks are in tests/test_attack_auth.py; these pin the rules quickly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backorder.config import Settings
from backorder.state import StateStore
from backorder.web import FORM_DEFAULTS, create_app
from backorder.web.auth import RateLimiter, TrustedProxies, allows, is_loopback
from tests.conftest import make_settings

BODY = {"records": [FORM_DEFAULTS]}
LOCAL = "http://127.0.0.1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def keyed(trained_settings: Settings) -> Iterator[tuple[TestClient, dict[str, str], StateStore]]:
    """A keys-mode app and one key per role."""
    store = StateStore.open(trained_settings)
    tokens = {
        role: store.create_key(f"k-{role}", role)
        for role in ("viewer", "planner", "admin", "metrics")
    }
    with TestClient(create_app(trained_settings), base_url=LOCAL, follow_redirects=False) as client:
        yield client, tokens, store
    store.dispose()


def test_roles_are_ordered_and_metrics_stands_apart() -> None:
    assert allows("admin", "planner") and allows("planner", "viewer") and allows("viewer", "viewer")
    assert not allows("viewer", "planner") and not allows("planner", "admin")
    assert allows("metrics", "metrics") and allows("admin", "metrics")
    assert not allows("metrics", "viewer") and not allows("planner", "metrics")
    assert not allows(None, "viewer")


def test_loopback_and_trusted_proxy_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("::")
    proxies = TrustedProxies(["10.1.0.0/16", "::1"])
    assert "10.1.2.3" in proxies and "::1" in proxies
    assert "10.2.0.1" not in proxies and "testclient" not in proxies and None not in proxies


def test_rate_limiter_refuses_over_the_rate_and_says_when_to_retry() -> None:
    limiter = RateLimiter(60)
    assert all(limiter.wait_seconds("a") == 0 for _ in range(60))
    wait = limiter.wait_seconds("a")
    assert 0 < wait <= 1.0  # one request a second refills
    assert limiter.wait_seconds("b") == 0  # per caller


def test_no_key_wrong_key_and_roles(keyed: tuple[TestClient, dict[str, str], StateStore]) -> None:
    client, tokens, _ = keyed
    refused = client.post("/v1/predict", json=BODY)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert "backorder keys create" in refused.json()["detail"]
    assert (
        client.post("/v1/predict", json=BODY, headers=bearer("bo_" + "x" * 43)).status_code == 401
    )
    assert client.get("/v1/model", headers={"Authorization": "Basic abc"}).status_code == 401
    for role in ("viewer", "planner", "admin"):
        assert (
            client.post("/v1/predict", json=BODY, headers=bearer(tokens[role])).status_code == 200
        )
        assert client.get("/v1/model", headers=bearer(tokens[role])).status_code == 200
    assert (
        client.post("/v1/predict", json=BODY, headers=bearer(tokens["metrics"])).status_code == 403
    )
    assert client.get("/metrics", headers=bearer(tokens["metrics"])).status_code == 200
    assert client.get("/metrics", headers=bearer(tokens["admin"])).status_code == 200
    denied = client.get("/metrics", headers=bearer(tokens["planner"]))
    assert denied.status_code == 403 and "needs metrics" in denied.json()["detail"]
    assert client.get("/metrics").status_code == 401
    upload = client.post(
        "/upload",
        files={"file": ("b.csv", b"sku\n1\n", "text/csv")},
        headers=bearer(tokens["viewer"]),
    )
    assert upload.status_code == 403 and "needs planner" in upload.json()["detail"]
    # Probes stay open.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_revoked_key_stops_working_within_two_seconds(
    keyed: tuple[TestClient, dict[str, str], StateStore],
) -> None:
    client, tokens, store = keyed
    assert client.get("/v1/model", headers=bearer(tokens["viewer"])).status_code == 200
    store.revoke_key("k-viewer")
    deadline = time.monotonic() + 2.5
    while client.get("/v1/model", headers=bearer(tokens["viewer"])).status_code == 200:
        assert time.monotonic() < deadline, "revoked key still accepted after 2.5 s"
        time.sleep(0.1)
    assert client.get("/v1/model", headers=bearer(tokens["planner"])).status_code == 200


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF field in the page"
    return found.group(1)


def test_page_sign_in_session_csrf_and_sign_out(
    keyed: tuple[TestClient, dict[str, str], StateStore],
) -> None:
    client, tokens, _ = keyed
    # A browser without a session is sent to the sign-in page.
    bounced = client.get("/", headers={"accept": "text/html"})
    assert bounced.status_code == 303 and bounced.headers["location"] == "/signin"
    signin = client.get("/signin")
    assert signin.status_code == 200 and 'type="password"' in signin.text
    form_csrf = csrf_of(signin.text)
    # Without the sign-in form's CSRF token, or with a wrong key: refused.
    no_csrf = client.post("/signin", data={"key": tokens["planner"]})
    assert no_csrf.status_code == 403
    wrong = client.post("/signin", data={"key": "nope", "csrf_token": form_csrf})
    assert wrong.status_code == 401 and "Unknown or revoked key" in wrong.text
    started = client.post("/signin", data={"key": tokens["planner"], "csrf_token": form_csrf})
    assert started.status_code == 303
    cookie = started.headers["set-cookie"]
    assert "backorder_session=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie.replace("SameSite=Strict", "SameSite=strict")
    assert "Secure" not in cookie  # plain HTTP here; over TLS it is Secure
    page = client.get("/")
    assert page.status_code == 200 and "k-planner" in page.text
    csrf = csrf_of(page.text)
    values = {k: str(v) for k, v in FORM_DEFAULTS.items()}
    # A form post with the session but no (or a wrong) CSRF token is refused.
    assert client.post("/", data=values).status_code == 403
    assert client.post("/", data={**values, "csrf_token": "forged"}).status_code == 403
    scored = client.post("/", data={**values, "csrf_token": csrf})
    assert scored.status_code == 200 and 'id="probability"' in scored.text
    # Sign out needs the token too, then the session is gone.
    assert client.post("/signout").status_code == 403
    out = client.post("/signout", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/signin"
    client.cookies.clear()
    assert client.get("/", headers={"accept": "text/html"}).status_code == 303


def test_session_cookie_is_secure_behind_a_tls_proxy(
    keyed: tuple[TestClient, dict[str, str], StateStore], trained_settings: Settings
) -> None:
    _, tokens, _ = keyed
    app = create_app(trained_settings)
    with TestClient(app, base_url=LOCAL, client=("127.0.0.1", 5000), follow_redirects=False) as c:
        csrf = csrf_of(c.get("/signin").text)
        started = c.post(
            "/signin",
            data={"key": tokens["viewer"], "csrf_token": csrf},
            headers={"x-forwarded-proto": "https"},
        )
        assert started.status_code == 303 and "Secure" in started.headers["set-cookie"]


def proxy_app(settings: Settings, **overrides: Any) -> Settings:
    return make_settings(
        settings.home,
        auth="proxy",
        proxy_group_roles={"planning": "planner", "staff": "viewer"},
        **overrides,
    )


def test_proxy_headers_count_only_from_trusted_addresses(trained_settings: Settings) -> None:
    settings = proxy_app(trained_settings, trusted_proxies=["10.0.0.2"])
    who = {"x-forwarded-email": "ana@example.com", "x-forwarded-groups": "staff,planning"}
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL, client=("10.0.0.2", 4000)) as trusted:
        answer = trusted.post("/v1/predict", json=BODY, headers=who)
        assert answer.status_code == 200, answer.text
        assert trusted.get("/metrics", headers=who).status_code == 403  # planner, not metrics
        nobody = trusted.post(
            "/v1/predict", json=BODY, headers={"x-forwarded-email": "bo@example.com"}
        )
        assert nobody.status_code == 403 and "no role" in nobody.json()["detail"]
    with TestClient(create_app(settings), base_url=LOCAL, client=("10.0.0.9", 4000)) as forged:
        refused = forged.post("/v1/predict", json=BODY, headers=who)
        assert (
            refused.status_code == 401 and "proxy did not identify you" in refused.json()["detail"]
        )


def test_rate_limit_answers_429_with_retry_after(trained_settings: Settings) -> None:
    settings = make_settings(trained_settings.home, rate_limit_per_minute=5)
    token = StateStore.open(settings).create_key("busy", "viewer")
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        codes = [client.get("/v1/model", headers=bearer(token)).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        over = client.get("/v1/model", headers=bearer(token))
        assert int(over.headers["retry-after"]) >= 1 and "rate limit" in over.json()["detail"]
        assert client.get("/healthz").status_code == 200  # probes are never limited
        # Unidentified callers are limited per address.
        assert [client.get("/v1/model").status_code for _ in range(6)][-1] == 429
