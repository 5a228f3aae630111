"""Latency, throughput and memory of `crv serve` on this machine (a real server on 127.0.0.1).

    python benchmarks/service.py

Starts `crv serve` (shipped model, transcoders and verifier; 2 torch threads) in a subprocess,
then, all bounded in count and time:

1. latency: single requests, one at a time, of 5-step arithmetic traces written by the reasoner
   (n = 5) -> p50 / p95 / p99 of the request latency divided by its steps;
2. throughput: 1, 8 and 32 concurrent clients sending those traces -> verified steps per second
   (errors = any answer other than 200 after the client's Retry-After retries);
3. memory: the server's RSS after a warm-up and after 2,000 more small requests (valid ones and
   malformed ones) -> relative growth.

Writes benchmarks/results/service.json.

    python benchmarks/service.py --overload       # only the overload run -> service.json["overload"] (other keys kept)

Overload: ``--clients`` (50) clients send 5-step traces without pause for ``--overload-seconds`` (60), no
retries, against a server with the default admission settings (queue 16, an accepted request waits at
most 2 s, 1 torch thread); once alone and once with a busy neighbour process (a Python loop on one core).
Per run: accepted and rejected requests (429 queue full, 503 waited too long), accepted latency p50 / p95,
the longest queue wait the server saw (/metrics), the server's peak RSS, and any 5xx other than 503.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from crv.reasoner.generate import generate_records
from crv.lm.encode import trace_encoder
from crv.lm.load import load_model
from crv.tasks.cot import generate_problems

RESULTS = Path(__file__).parent / "results"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def five_step_traces(count: int, seed: int) -> list[dict]:
    model, tok = load_model()
    recs = generate_records(model, trace_encoder(tok), generate_problems("arith", 5, count * 3, seed=seed), progress=False)
    traces = [{"task": "arith", "question": r.question, "steps": r.steps} for r in recs if len(r.steps) == 5]
    if len(traces) < count:
        raise RuntimeError(f"only {len(traces)} complete 5-step traces")
    return traces[:count]


def post(client: httpx.Client, body: dict, retries: int = 20) -> httpx.Response:
    for _ in range(retries):
        r = client.post("/v1/verify", json=body)
        if r.status_code != 429:
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))
    return r


def throughput(url: str, traces: list[dict], clients: int, seconds: float, max_requests: int) -> tuple[float, int, int]:
    """Steps/s with ``clients`` concurrent clients for about ``seconds`` (at most ``max_requests`` requests)."""
    lock = threading.Lock()
    state = {"sent": 0, "steps": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            k = i
            while time.perf_counter() < deadline:
                with lock:
                    if state["sent"] >= max_requests:
                        return
                    state["sent"] += 1
                body = traces[k % len(traces)]
                k += clients
                r = post(c, body)
                with lock:
                    if r.status_code == 200:
                        state["steps"] += len(body["steps"])
                    else:
                        state["errors"] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return state["steps"] / wall, state["errors"], state["sent"]


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CRV_API_KEY": ""}
    server = subprocess.Popen([sys.executable, "-m", "crv.cli", "serve", "--port", str(port), *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def overload_run(traces: list[dict], clients: int, seconds: float, neighbour: bool) -> dict:
    """One overload run against a fresh server (default admission settings); see the module docstring."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"]) \
        if neighbour else None
    server = start_server(port, [])
    lock = threading.Lock()
    state: dict = {"accepted": [], "429": 0, "503": 0, "other": 0, "5xx": 0, "rss": 0.0}
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            k = i
            while time.perf_counter() < deadline:
                body = traces[k % len(traces)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/verify", json=body)
                except httpx.HTTPError:
                    with lock:
                        state["other"] += 1
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        state["accepted"].append(dt)
                    elif r.status_code in (429, 503):
                        state[str(r.status_code)] += 1
                        time.sleep(0.05)  # a client that obeys no Retry-After: the worst case, bounded
                    else:
                        state["5xx" if r.status_code >= 500 else "other"] += 1

    def watch() -> None:
        while time.perf_counter() < deadline + 5 and server.poll() is None:
            try:
                state["rss"] = max(state["rss"], rss_mb(server.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.25)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)] + [threading.Thread(target=watch)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(url + "/metrics", timeout=10).text
        max_wait = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("crv_queue_wait_seconds_max"))
    finally:
        server.terminate()
        server.wait(60)
        if busy is not None:
            busy.kill()
    acc = state["accepted"]
    return {"clients": clients, "seconds": seconds, "accepted": len(acc), "rejected": state["429"] + state["503"],
            "rejected_429": state["429"], "rejected_503": state["503"], "server_errors_5xx": state["5xx"],
            "other_errors": state["other"],
            "accepted_p50_s": round(float(np.percentile(acc, 50)), 3) if acc else None,
            "accepted_p95_s": round(float(np.percentile(acc, 95)), 3) if acc else None,
            "max_wait_s": round(max_wait, 3), "rss_peak_mb": round(state["rss"], 1)}


def body_abuse(clients: int = 10, gigabytes: float = 1.0) -> dict:
    """``clients`` clients at once each offer a ``gigabytes`` chunked body (no Content-Length) to /v1/verify and to
    a path that reads no body; the server's peak RSS over the run, against its RSS before."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, [])
    before = rss_mb(server.pid)
    peak, statuses, stop = [before], [], threading.Event()
    chunk = b"x" * (1 << 20)

    def body():
        for _ in range(int(gigabytes * 1024)):
            yield chunk

    def client(i: int) -> None:
        path = "/v1/verify" if i % 2 == 0 else "/nothing"
        try:
            r = httpx.post(url + path, content=body(), headers={"Content-Type": "application/json"}, timeout=600)
            statuses.append(r.status_code)
        except httpx.HTTPError:
            statuses.append("closed")  # refused while the client was still sending

    def watch() -> None:
        while not stop.is_set():
            peak.append(rss_mb(server.pid))
            time.sleep(0.1)

    w = threading.Thread(target=watch)
    w.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    seconds = time.perf_counter() - t0
    alive = httpx.get(url + "/healthz", timeout=10).status_code == 200
    server.terminate()
    server.wait(60)
    return {"clients": clients, "gigabytes_each": gigabytes, "statuses": sorted(map(str, statuses)),
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(peak), 1), "seconds": round(seconds, 1),
            "server_alive_after": alive}


def overload(args: argparse.Namespace, command: str) -> None:
    abuse = body_abuse()
    print("chunked 1 GB bodies:", json.dumps(abuse))
    traces = five_step_traces(20, args.seed)
    alone = overload_run(traces, args.clients, args.overload_seconds, neighbour=False)
    print("alone:", json.dumps(alone))
    shared = overload_run(traces, args.clients, args.overload_seconds, neighbour=True)
    print("with a busy neighbour:", json.dumps(shared))
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out["body_abuse"] = abuse
    out["overload"] = {**alone, "neighbour": shared, "targets_met": all(
        r["accepted_p95_s"] is not None and r["accepted_p95_s"] <= 3 and r["server_errors_5xx"] == 0 for r in (alone, shared)),
        "command": command}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}['overload']")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=60, help="per throughput level")
    ap.add_argument("--max-requests", type=int, default=400, help="per throughput level")
    ap.add_argument("--soak-requests", type=int, default=2000)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--classifier", type=Path, default=None, help="verifier to serve (default: the shipped default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "service.json")
    ap.add_argument("--overload", action="store_true", help="only the overload runs (alone and with a busy neighbour)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--overload-seconds", type=float, default=60)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/service.py", *sys.argv[1:]])
    if args.overload:
        return overload(args, command)

    traces = five_step_traces(20, args.seed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CRV_API_KEY": ""}
    server = subprocess.Popen([sys.executable, "-m", "crv.cli", "serve", "--port", str(port), "--threads", "2",
                               "--max-queue", str(args.max_queue)]
                              + (["--classifier", str(args.classifier)] if args.classifier else []), env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError("the server exited")
            time.sleep(0.2)
        errors = 0
        with httpx.Client(base_url=url, timeout=600) as c:
            for t in traces[:3]:  # warm-up
                errors += post(c, t).status_code != 200
            per_step = []
            for i in range(args.latency_requests):
                body = traces[i % len(traces)]
                t0 = time.perf_counter()
                r = post(c, body)
                dt = time.perf_counter() - t0
                errors += r.status_code != 200
                per_step.append(1000 * dt / len(body["steps"]))
        p50, p95, p99 = (float(np.percentile(per_step, q)) for q in (50, 95, 99))
        print(f"latency per step (5-step traces): p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms")
        rates = {}
        for n in (1, 8, 32):
            rate, errs, sent = throughput(url, traces, n, args.seconds, args.max_requests)
            rates[str(n)] = rate
            errors += errs
            print(f"{n:>2} clients: {rate:.1f} steps/s ({sent} requests, {errs} errors)")
        # memory soak: small valid requests and malformed ones
        small = {"task": "arith", "question": "1+2", "steps": ["1+2=3 => 3"]}
        bad = [{"task": "arith", "question": "1+2", "steps": ["1+2=3 € 3"]}, {"task": "arith"}, {"task": "x", "question": "1", "steps": ["1"]}]
        with httpx.Client(base_url=url, timeout=600) as c:
            for _ in range(50):
                post(c, small)
            before = rss_mb(server.pid)
            t0 = time.perf_counter()
            soak_errors = 0
            for i in range(args.soak_requests):
                if i % 4 == 3:
                    r = c.post("/v1/verify", json=bad[i % 3])
                    soak_errors += r.status_code != 422
                else:
                    soak_errors += post(c, small).status_code != 200
            after = rss_mb(server.pid)
        errors += soak_errors
        growth = (after - before) / before
        print(f"RSS {before:.0f} MB -> {after:.0f} MB after {args.soak_requests} requests ({100 * growth:+.1f}%), "
              f"{time.perf_counter() - t0:.0f} s")
    finally:
        server.terminate()
        server.wait(30)
    out = {"p50_ms_per_step": p50, "p95_ms_per_step": p95, "p99_ms_per_step": p99, "steps_per_s": rates,
           "errors": int(errors), "rss_growth": growth, "rss_mb": {"before": before, "after": after},
           "settings": {"latency_requests": args.latency_requests, "seconds_per_level": args.seconds,
                        "max_requests_per_level": args.max_requests, "soak_requests": args.soak_requests,
                        "max_queue": args.max_queue, "trace_steps": 5, "torch_threads": 2,
                        "classifier": str(args.classifier or "models/classifiers/default")},
           "command": command}
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
