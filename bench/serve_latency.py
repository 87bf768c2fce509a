"""Benchmark: latency and throughput of `backorder serve`, against the bare model call.

In one run, on loopback:
1. floor: the in-process scoring call the endpoint makes (validated record -> probability and
   three reasons), and LightGBM's own single-row predict;
2. sequential: one client, one record with reasons per request, keep-alive; p50 / p99;
3. concurrent: 8 connections for 10 s with wrk (C load generator, 1 thread so that the server
   keeps a core) or, without wrk, 8 Python threads; requests/s, p50 / p99 and errors.

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


def sequential(url: str, n: int) -> tuple[list[float], int]:
    body = {"records": [RECORD]}
    times, errors = [], 0
    with httpx.Client(timeout=10) as client:
        for _ in range(50):
            client.post(f"{url}/v1/predict", json=body)
        for _ in range(n):
            t = time.perf_counter()
            r = client.post(f"{url}/v1/predict", json=body)
            times.append(time.perf_counter() - t)
            errors += r.status_code != 200
    return times, errors


def concurrent_wrk(url: str, seconds: int, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps({'records': [RECORD]}))}\n"
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


def concurrent_python(url: str, seconds: int) -> dict[str, float]:
    body = {"records": [RECORD]}
    stop = time.perf_counter() + seconds
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client_loop() -> None:
        local, bad = [], 0
        with httpx.Client(timeout=10) as client:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = client.post(f"{url}/v1/predict", json=body)
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
        port = free_port()
        env = {**os.environ, "BACKORDER_HOME": str(home)}
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("backorder")), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            seq, seq_errors = sequential(url, args.requests)
            conc = (
                concurrent_wrk(url, args.seconds, tmp)
                if shutil.which("wrk")
                else concurrent_python(url, args.seconds)
            )
        finally:
            server.terminate()
            server.wait(timeout=20)
    ms = 1000.0
    print(f"model: trained on {trained_on}, {f['trees']} trees; 1 uvicorn worker, 2 cores")
    print("| what | p50 | p99 | requests/s | errors |")
    print("|---|---|---|---|---|")
    print(f"| floor: LightGBM predict, 1 row | {f['bare_p50'] * ms:.2f} ms | | | |")
    print(
        f"| floor: in-process scoring call (validate, features, probability, 3 reasons) "
        f"| {f['call_p50'] * ms:.2f} ms | {f['call_p99'] * ms:.2f} ms | | |"
    )
    print(
        f"| HTTP, sequential, 1 record with reasons ({args.requests:,} requests) "
        f"| {pct(seq, 50) * ms:.2f} ms | {pct(seq, 99) * ms:.2f} ms "
        f"| {len(seq) / sum(seq):,.0f} | {seq_errors} |"
    )
    print(
        f"| HTTP, 8 concurrent clients ({conc['tool']}, {args.seconds} s) "
        f"| {conc['p50'] * ms:.2f} ms | {conc['p99'] * ms:.2f} ms | {conc['rps']:,.0f} "
        f"| {conc['errors']:.0f} |"
    )
    print(
        f"ratio sequential p50 / in-process call p50: {statistics.median(seq) / f['call_p50']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
