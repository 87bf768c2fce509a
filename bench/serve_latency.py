"""Benchmark: latency and throughput of `backorder serve`, against the bare model call.

In one run, on loopback:
1. floor: the in-process scoring call the endpoint makes (validated record -> probability and
   three reasons), and LightGBM's own single-row predict;
2. sequential: one client, one record with reasons per request, keep-alive; p50 / p99;
3. concurrent: 8 connections for 10 s with wrk (C load generator, 1 thread so that the server
   keeps a core) or, without wrk, 8 Python threads; requests/s, p50 / p99 and errors.

Steps 2 and 3 run against two servers of the same model: `auth: keys` (the default; a Bearer key
on every request, the rate limiter on with a limit no client reaches) and `auth: none`, in
alternating blocks of requests so that the machine's noise falls on both alike. The difference
is what identity and limits cost a request.

The model is trained first with the default settings on both shared samples when they are
beside the checkout (the production-sized model), else on the bundled sample; say which.

    .venv/bin/python bench/serve_latency.py [--requests 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "backorders"
SHARED_DATA = [
    SHARED / "train_sample10pct_stratified.csv.gz",
    SHARED / "train_first1048575_sample20pct.csv.gz",
]
RECORD = {
    "sku": "3285000",
    "national_inv": 2,
    "lead_time": 8,
    "in_transit_qty": 0,
    "forecast_3_month": 120,
    "forecast_6_month": 240,
    "forecast_9_month": 360,
    "sales_1_month": 30,
    "sales_3_month": 90,
    "sales_6_month": 180,
    "sales_9_month": 270,
    "min_bank": 10,
    "pieces_past_due": 0,
    "perf_6_month_avg": 0.8,
    "perf_12_month_avg": 0.82,
    "local_bo_qty": 0,
    "potential_issue": "No",
    "deck_risk": "Yes",
    "oe_constraint": "No",
    "ppap_risk": "No",
    "stop_auto_buy": "Yes",
    "rev_stop": "No",
}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(home: Path) -> str:
    data = (
        SHARED_DATA
        if all(p.is_file() for p in SHARED_DATA)
        else [ROOT / "data/sample/labelled.csv.gz"]
    )
    args = [str(Path(sys.executable).with_name("backorder")), "train"]
    for path in data:
        args += ["--data", str(path)]
    env = {**os.environ, "BACKORDER_HOME": str(home)}
    subprocess.run(args, env=env, check=True, capture_output=True)
    return " + ".join(p.name for p in data)


def floor(home: Path, n: int) -> dict[str, float]:
    from backorder.api_schema import SkuRecord, records_frame
    from backorder.config import load_settings
    from backorder.predict import score_with_reasons
    from backorder.registry import Registry

    settings = load_settings(None, home=home)
    model = Registry(settings).load("champion")
    booster = model.classifier.booster_
    rows = records_frame([SkuRecord(**RECORD)])
    features = model.features(rows).to_numpy()
    call, bare = [], []
    for _ in range(n):
        t = time.perf_counter()
        score_with_reasons(model, records_frame([SkuRecord(**RECORD)]), settings)
        call.append(time.perf_counter() - t)
        t = time.perf_counter()
        booster.predict(features)
        bare.append(time.perf_counter() - t)
    return {
        "call_p50": pct(call, 50),
        "call_p99": pct(call, 99),
        "bare_p50": pct(bare, 50),
        "trees": booster.num_trees(),
    }


def sequential(servers: dict[str, Server], n: int, block: int = 100) -> dict[str, list[float]]:
    """`n` requests to each server, in alternating blocks of `block`; latencies per server."""
    body = {"records": [RECORD]}
    times: dict[str, list[float]] = {name: [] for name in servers}
    clients = {
        name: httpx.Client(base_url=s.url, headers=s.headers, timeout=10)
        for name, s in servers.items()
    }
    try:
        for client in clients.values():
            for _ in range(50):
                client.post("/v1/predict", json=body).raise_for_status()
        for _ in range(0, n, block):
            for name, client in clients.items():
                for _ in range(block):
                    t = time.perf_counter()
                    r = client.post("/v1/predict", json=body)
                    times[name].append(time.perf_counter() - t)
                    r.raise_for_status()
    finally:
        for client in clients.values():
            client.close()
    return times


def concurrent_wrk(server: Server, seconds: int, tmp: Path) -> dict[str, float]:
    url = server.url
    script = tmp / "post.lua"
    auth = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in server.headers.items())
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + auth
        + f"wrk.body = {json.dumps(json.dumps({'records': [RECORD]}))}\n"
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("RESULT %d %d %d %d %d %f %f\\n", summary.requests,\n'
        "    summary.errors.connect + summary.errors.read + summary.errors.write +\n"
        "    summary.errors.timeout, summary.errors.status, summary.duration, 0,\n"
        "    latency:percentile(50), latency:percentile(99)))\n"
        "end\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(script), f"{url}/v1/predict"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = next(line for line in out.splitlines() if line.startswith("RESULT")).split()
    requests, socket_errors, status_errors, duration_us = map(int, fields[1:5])
    return {
        "rps": requests / (duration_us / 1e6),
        "errors": socket_errors + status_errors,
        "p50": float(fields[6]) / 1e6,
        "p99": float(fields[7]) / 1e6,
        "tool": "wrk -t1 -c8",
    }


def concurrent_python(server: Server, seconds: int) -> dict[str, float]:
    body = {"records": [RECORD]}
    stop = time.perf_counter() + seconds
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client_loop() -> None:
        local, bad = [], 0
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=10) as client:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = client.post("/v1/predict", json=body)
                local.append(time.perf_counter() - t)
                bad += r.status_code != 200
        with lock:
            times.extend(local)
            errors[0] += bad

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "rps": len(times) / elapsed,
        "errors": errors[0],
        "p50": pct(times, 50),
        "p99": pct(times, 99),
        "tool": "8 Python threads",
    }


@dataclass
class Server:
    url: str
    headers: dict[str, str]
    process: subprocess.Popen[bytes]


def start(home: Path, auth: str) -> Server:
    """`backorder serve` with `auth` (keys: with a fresh viewer key), ready to answer."""
    port = free_port()
    headers: dict[str, str] = {}
    if auth == "keys":
        from backorder.config import load_settings
        from backorder.state import StateStore

        with StateStore.open(load_settings(None, home=home)) as store:
            token = store.create_key(f"bench-{port}", "viewer")
        headers = {"Authorization": f"Bearer {token}"}
    env = {
        **os.environ,
        "BACKORDER_HOME": str(home),
        "BACKORDER_AUTH": auth,
        # On, but out of reach: the limiter's cost is measured, not its refusals.
        "BACKORDER_RATE_LIMIT_PER_MINUTE": "1000000000",
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("backorder")), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return Server(url, headers, process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--home", type=Path, default=None, help="serve this registry's champion")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.home:
            home, trained_on = args.home, f"the champion in {args.home}"
        else:
            home = tmp / "home"
            print("training the model to serve ...", flush=True)
            trained_on = train(home)
        f = floor(home, args.requests)
        servers: dict[str, Server] = {}
        try:
            for auth in ("keys", "none"):  # one after the other: the first compiles the trees
                servers[auth] = start(home, auth)
            seq = sequential(servers, args.requests)
            conc = {
                name: concurrent_wrk(server, args.seconds, tmp)
                if shutil.which("wrk")
                else concurrent_python(server, args.seconds)
                for name, server in servers.items()
            }
        finally:
            for server in servers.values():
                server.process.terminate()
                server.process.wait(timeout=20)
    ms = 1000.0
    print(f"model: trained on {trained_on}, {f['trees']} trees; 1 uvicorn worker, 2 cores")
    print("| what | p50 | p99 | requests/s | errors |")
    print("|---|---|---|---|---|")
    print(f"| floor: LightGBM predict, 1 row | {f['bare_p50'] * ms:.2f} ms | | | |")
    print(
        f"| floor: in-process scoring call (validate, features, probability, 3 reasons) "
        f"| {f['call_p50'] * ms:.2f} ms | {f['call_p99'] * ms:.2f} ms | | |"
    )
    for name in servers:
        label = "auth keys (Bearer key, rate limiter)" if name == "keys" else "auth none"
        times = seq[name]
        print(
            f"| HTTP, sequential, 1 record with reasons, {label} ({len(times):,} requests) "
            f"| {pct(times, 50) * ms:.2f} ms | {pct(times, 99) * ms:.2f} ms "
            f"| {len(times) / sum(times):,.0f} | 0 |"
        )
    for name in servers:
        label = "auth keys" if name == "keys" else "auth none"
        c = conc[name]
        print(
            f"| HTTP, 8 concurrent clients, {label} ({c['tool']}, {args.seconds} s) "
            f"| {c['p50'] * ms:.2f} ms | {c['p99'] * ms:.2f} ms | {c['rps']:,.0f} "
            f"| {c['errors']:.0f} |"
        )
    added = (statistics.median(seq["keys"]) - statistics.median(seq["none"])) * ms
    print(f"auth adds {added:+.3f} ms to the sequential p50 (budget: 0.2 ms)")
    print(
        "ratio sequential p50 (auth keys) / in-process call p50: "
        f"{statistics.median(seq['keys']) / f['call_p50']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
