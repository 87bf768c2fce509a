"""API keys for tests: the server is closed to the unidentified, so tests sign in like users."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from backorder.config import Role, Settings, load_settings
from backorder.state import StateStore

LOCAL = "http://127.0.0.1"  # a trusted host; TestClient's default "testserver" is not


def make_key(home: Path | Settings, role: Role = "admin", name: str | None = None) -> str:
    """A new key in the state store of `home` (a folder or settings); returns its token."""
    settings = home if isinstance(home, Settings) else load_settings(None, home=home)
    store = StateStore.open(settings)
    try:
        return store.create_key(name or f"test-{role}-{uuid.uuid4().hex[:8]}", role)
    finally:
        store.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def signed_in_client(
    settings: Settings, role: Role = "admin", **kwargs: object
) -> Iterator[TestClient]:
    """FastAPI's TestClient on the real app, sending a key of `role` with every request."""
    from backorder.web import create_app

    headers = bearer(make_key(settings, role))
    with TestClient(create_app(settings), base_url=LOCAL, headers=headers, **kwargs) as client:  # type: ignore[arg-type]
        yield client
