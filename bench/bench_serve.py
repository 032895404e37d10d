"""Serving a fleet under live traffic: fusecc serve against the two ways fleets are served today.

    python bench/bench_serve.py --fleet resnet18 --n 16 --popularity uniform zipf --markdown

Systems, all started as `fusecc serve` processes on 127.0.0.1 with the same batcher settings (max batch, max delay)
and loaded from the same N checkpoints:

- ``process-per-model``: N processes, each serving ONE eager model with its own dynamic batcher (how TorchServe /
  text-embeddings-inference fleets are deployed: a worker per model), 1 torch thread each;
- ``per-model``: one server holding the N eager models, batching per model: each batch runs one call per model
  that has rows (``--mode per-model``);
- ``fusecc``: one server, the fused fleet (``--mode fused``): one fused call per batch for the rows of every model,
  the busiest models' extra rows alone, as its measured costs say.

The load generator (this process, aiohttp's client) sends open-loop Poisson arrivals, one row per request, each for a model drawn
uniformly or by Zipf(1.1) popularity, for a fixed time per offered rate; a request's latency runs from its scheduled
arrival (no coordinated omission) to its answer. Rates rise by --step until the p99 passes --p99-ms or answers fall
behind; the sustainable throughput is the highest answered rate with p99 within the bound and no errors. Before the
sweep every system answers the same request per model, and the answers are compared across systems (same weights).

Fleets: resnet18 (10 classes, 32x32 images, binary tensor data as tritonclient sends it) and the BERT-small
classifier of bench_hf.py (JSON token ids, 8-64 tokens). Bounded: --seconds per rate, --max-rates rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ["process-per-model", "per-model", "fusecc"]
HEADER = "Inference-Header-Content-Length"


# -------------------------------------------------------------------------------------------- the fleets
def resnet18() -> nn.Module:
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def bert_small() -> nn.Module:
    import transformers as T
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        num_labels=2))


FLEETS = {"resnet18": (resnet18, "1,3,32,32"), "bert": (bert_small, "1,32")}


def write_checkpoints(fleet: str, n: int, d: str) -> List[str]:
    torch.manual_seed(0)
    factory = FLEETS[fleet][0]
    paths = []
    for i in range(n):
        m = factory().eval()
        with torch.no_grad():  # fine-tuned copies: every weight differs a little (nothing is shared)
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        p = os.path.join(d, f"m{i:02d}.pt")
        torch.save(m.state_dict(), p)
        paths.append(p)
    return paths


def bodies(fleet: str, n_bodies: int, seed: int) -> List[Tuple[bytes, Dict[str, str]]]:
    """Request bodies (one row each): binary FP32 images, or JSON token ids of 8-64 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_bodies):
        if fleet == "resnet18":
            x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
            raw = x.tobytes()
            head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                           "parameters": {"binary_data_size": len(raw)}}]}).encode()
            out.append((head + raw, {HEADER: str(len(head)), "content-type": "application/octet-stream"}))
        else:
            length = int(rng.integers(8, 65))
            ids = rng.integers(1000, 30000, (1, length)).tolist()
            doc = {"inputs": [{"name": "input_ids", "shape": [1, length], "datatype": "INT64", "data": ids}]}
            out.append((json.dumps(doc).encode(), {"content-type": "application/json"}))
    return out


def output_of(content: bytes, headers: Any) -> np.ndarray:
    if HEADER.lower() in {k.lower() for k in headers}:
        n = int(headers[HEADER])
        doc = json.loads(content[:n])
        o = doc["outputs"][0]
        return np.frombuffer(content[n:n + o["parameters"]["binary_data_size"]], np.float32).reshape(o["shape"])
    o = json.loads(content)["outputs"][0]
    return np.asarray(o["data"], np.float32).reshape(o["shape"])


# -------------------------------------------------------------------------------------------- the servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    """The server processes of one system; ``url(k)`` is where model k is served."""

    def __init__(self, system: str, fleet: str, paths: Sequence[str], a: argparse.Namespace) -> None:
        self.system, self.procs, self.urls = system, [], []
        arch = f"{os.path.abspath(__file__)}:{FLEETS[fleet][0].__name__}"
        common = ["--arch", arch, "--example-input", FLEETS[fleet][1], "--max-batch", str(a.max_batch),
                  "--max-delay-ms", str(a.max_delay_ms), "--max-queue", "4096", "--log-level", "warning", "-q"]
        env = {**os.environ, "PYTHONPATH": ROOT}
        n = len(paths)
        names = [f"m{i:02d}" for i in range(n)]
        if system == "process-per-model":
            for i in range(n):
                port = free_port()
                cmd = [sys.executable, "-m", "fusecc", "serve", *common, "--weights", paths[i], "--names", names[i],
                       "--mode", "per-model", "--threads", "1", "--port", str(port)]
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                self.urls.append(f"http://127.0.0.1:{port}/v2/models/{names[i]}/infer")
        else:
            port = free_port()
            cmd = [sys.executable, "-m", "fusecc", "serve", *common, "--weights", *paths, "--names", *names,
                   "--mode", "fused" if system == "fusecc" else "per-model", "--threads", str(a.threads),
                   "--port", str(port)]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            self.urls = [f"http://127.0.0.1:{port}/v2/models/{nm}/infer" for nm in names]

    def wait_ready(self, timeout: float) -> float:
        import httpx
        t0 = time.monotonic()
        bases = sorted({u.split("/v2/")[0] for u in self.urls})
        for base in bases:
            while True:
                if any(p.poll() is not None for p in self.procs):
                    err = next(p for p in self.procs if p.poll() is not None).stderr.read().decode()
                    raise RuntimeError(f"{self.system}: a server exited: {err[-2000:]}")
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"{self.system}: not ready after {timeout} s")
                try:
                    if httpx.get(base + "/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        return time.monotonic() - t0

    def rss_mib(self) -> float:
        import psutil
        total = 0
        for p in self.procs:
            try:
                total += psutil.Process(p.pid).memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -------------------------------------------------------------------------------------------- the load
def popularity(kind: str, n: int) -> np.ndarray:
    w = np.ones(n) if kind == "uniform" else 1.0 / np.arange(1, n + 1) ** 1.1
    return w / w.sum()


async def _load(urls: Sequence[str], reqs: Sequence[Tuple[bytes, Dict[str, str]]], rate: float, seconds: float,
                weights: np.ndarray, seed: int, timeout: float) -> Dict[str, Any]:
    """Open-loop Poisson arrivals for ``seconds`` through aiohttp's client (C-accelerated HTTP parsing: the client
    must cost less than the servers it loads, on the same two cores), keep-alive connections."""
    import aiohttp
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * seconds * 1.5) + 16)
    times = np.cumsum(gaps)
    times = times[times < seconds]
    models = rng.choice(len(urls), size=len(times), p=weights)
    which = rng.integers(0, len(reqs), size=len(times))
    lat: List[float] = []
    errors: Dict[str, int] = {}
    loop = asyncio.get_running_loop()
    conn = aiohttp.TCPConnector(limit=2048, limit_per_host=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(t_sched: float, m: int, j: int) -> None:
            body, headers = reqs[j]
            try:
                async with session.post(urls[m], data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        lat.append(loop.time() - t_sched)
                    else:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

        t0 = loop.time() + 0.05
        tasks = []
        for t, m, j in zip(times, models, which):
            delay = t0 + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(t0 + t, int(m), int(j))))
        await asyncio.gather(*tasks)
    lat_ms = np.asarray(lat) * 1000
    return {"offered": rate, "sent": len(times), "ok": len(lat), "errors": errors,
            "throughput": len(lat) / seconds,
            "p50": float(np.percentile(lat_ms, 50)) if len(lat) else math.inf,
            "p99": float(np.percentile(lat_ms, 99)) if len(lat) else math.inf}


def sweep(urls: Sequence[str], reqs: Any, weights: np.ndarray, a: argparse.Namespace, log: Any) -> List[Dict]:
    points = []
    rate = a.start_rate
    for k in range(a.max_rates):
        asyncio.run(_load(urls, reqs, rate, 1.0, weights, 1000 + k, a.timeout))  # warm the connections and caches
        pt = asyncio.run(_load(urls, reqs, rate, a.seconds, weights, k, a.timeout))
        points.append(pt)
        log(f"    offered {rate:7.1f}/s: answered {pt['throughput']:7.1f}/s, p50 {pt['p50']:7.1f} ms, p99 "
            f"{pt['p99']:8.1f} ms, errors {pt['errors'] or 0}")
        if pt["p99"] > a.p99_ms * 2 or pt["errors"] or pt["throughput"] < 0.8 * rate:
            break
        rate *= a.step
    return points


def sustainable(points: Sequence[Dict], p99_ms: float) -> Optional[float]:
    ok = [p["throughput"] for p in points if p["p99"] <= p99_ms and not p["errors"]
          and p["throughput"] >= 0.9 * p["offered"]]
    return max(ok) if ok else None


def at_load(points: Sequence[Dict], rate: float) -> Optional[Dict]:
    for p in points:
        if abs(p["offered"] - rate) < 1e-6:
            return p
    return None


# -------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fleet", choices=list(FLEETS), nargs="+", default=["resnet18"])
    ap.add_argument("--n", type=int, nargs="+", default=[16])
    ap.add_argument("--popularity", choices=["uniform", "zipf"], nargs="+", default=["uniform", "zipf"])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-server systems")
    ap.add_argument("--start-rate", type=float, default=20.0)
    ap.add_argument("--step", type=float, default=1.5)
    ap.add_argument("--max-rates", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of load per offered rate")
    ap.add_argument("--p99-ms", type=float, default=250.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--max-processes", type=int, default=32,
                    help="process-per-model is not started beyond this many models (memory)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write every point here")
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import psutil
    from bench._common import machine_info, print_machine
    info = machine_info()
    print_machine(info)
    results: List[Dict[str, Any]] = []
    for fleet in a.fleet:
        for n in a.n:
            d = tempfile.mkdtemp(prefix="fusecc-bench-serve-")
            try:
                paths = write_checkpoints(fleet, n, d)
                reqs = bodies(fleet, 32, seed=0)
                answers: Dict[str, List[np.ndarray]] = {}
                for system in a.systems:
                    if system == "process-per-model" and n > a.max_processes:
                        log(f"{fleet} N={n} {system}: not started (more than --max-processes {a.max_processes})")
                        results.append({"fleet": fleet, "n": n, "system": system, "skipped": True})
                        continue
                    servers = Servers(system, fleet, paths, a)
                    try:
                        t_ready = servers.wait_ready(900)
                        rss = servers.rss_mib()
                        import httpx
                        answers[system] = [output_of(r.content, r.headers) for r in
                                           (httpx.post(servers.urls[k], content=reqs[0][0], headers=reqs[0][1],
                                                       timeout=60) for k in range(n))]
                        log(f"{fleet} N={n} {system}: ready in {t_ready:.0f} s, {rss:.0f} MiB resident")
                        for pop in a.popularity:
                            log(f"  popularity {pop}")
                            pts = sweep(servers.urls, reqs, popularity(pop, n), a, log)
                            results.append({"fleet": fleet, "n": n, "system": system, "popularity": pop,
                                            "rss_mib": rss, "ready_s": t_ready, "points": pts,
                                            "sustainable": sustainable(pts, a.p99_ms)})
                    finally:
                        servers.stop()
                ref = answers.get("per-model") or next(iter(answers.values()), None)
                for system, outs in answers.items():
                    err = max(float(np.abs(o - r).max()) for o, r in zip(outs, ref))
                    log(f"{fleet} N={n} {system}: max |answer - per-model answer| = {err:.2e}")
                    if err > 1e-3:
                        raise SystemExit(f"{system} answers differ from per-model by {err}")
            finally:
                shutil.rmtree(d, ignore_errors=True)
    mem_total = psutil.virtual_memory().total / 2**20
    print_table(results, a, mem_total)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "args": vars(a), "results": results}, f, indent=1)
    return 0


def print_table(results: List[Dict[str, Any]], a: argparse.Namespace, mem_total: float) -> None:
    print(f"\nsustainable throughput (requests/s of one row) with p99 <= {a.p99_ms:g} ms; max batch {a.max_batch}, "
          f"max delay {a.max_delay_ms:g} ms; resident memory of the servers (machine: {mem_total / 1024:.0f} GiB)\n")
    head = ["fleet", "N", "popularity", "process-per-model", "per-model", "fusecc", "fusecc / best other"]
    rows = []
    keys = sorted({(r["fleet"], r["n"], r.get("popularity")) for r in results if not r.get("skipped")},
                  key=lambda k: (k[0], k[1], k[2] or ""))
    for fleet, n, pop in keys:
        cells = {}
        for r in results:
            if r["fleet"] == fleet and r["n"] == n and (r.get("popularity") == pop or r.get("skipped")):
                if r.get("skipped"):
                    cells[r["system"]] = "not started (memory)"
                else:
                    s = r["sustainable"]
                    cells[r["system"]] = (f"{s:.0f}/s" if s else "< start rate") + f", {r['rss_mib'] / 1024:.1f} GiB"
                    cells[r["system"] + "_v"] = s
        others = [cells.get(s + "_v") for s in ("process-per-model", "per-model") if cells.get(s + "_v")]
        ratio = (f"{cells['fusecc_v'] / max(others):.2f}x" if cells.get("fusecc_v") and others else "n/a")
        rows.append([fleet, str(n), pop, cells.get("process-per-model", "-"), cells.get("per-model", "-"),
                     cells.get("fusecc", "-"), ratio])
    _grid(head, rows, a.markdown)
    print("\np50 / p99 ms at each offered load\n")
    head = ["fleet", "N", "popularity", "system", "offered/s", "answered/s", "p50 ms", "p99 ms", "errors"]
    rows = []
    for r in results:
        if r.get("skipped"):
            continue
        for p in r["points"]:
            rows.append([r["fleet"], str(r["n"]), r["popularity"], r["system"], f"{p['offered']:.0f}",
                         f"{p['throughput']:.0f}", f"{p['p50']:.1f}", f"{p['p99']:.1f}",
                         str(sum(p["errors"].values())) if p["errors"] else "0"])
    _grid(head, rows, a.markdown)


def _grid(head: List[str], rows: List[List[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
