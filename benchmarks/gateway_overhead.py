"""How much latency and throughput the gateway costs, against a zero-latency backend.

    python benchmarks/gateway_overhead.py --json            # writes benchmarks/results/gateway_overhead.json
    python benchmarks/gateway_overhead.py --soak 0          # skip the 100,000-request RSS soak
    python benchmarks/gateway_overhead.py _policy hybrid    # one policy call's cost, alone and via the decision core

One run starts, as separate processes on 127.0.0.1: a zero-latency OpenAI backend (`--backend
minimal`, the default: the small Starlette app in this file, the cheapest backend
and so the strictest comparison; or `--backend emulator`: `sagesched emulate vllm --time-scale 0`,
which spends more CPU per request and so flatters the ratio), the gateway in front of it
(`sagesched inference start`, policy and workers as given), and a load generator. The same
generator then drives the backend directly and through the gateway:

- open loop at fixed rates: requests leave at their scheduled times whatever the answers do, and
  latency counts from the scheduled time (so a stalled server cannot hide its queueing);
- closed loop with 64 concurrent clients, each on its own keep-alive connection: the throughput;
- a soak of `--soak` requests (100,000 by default) through the gateway, its RSS sampled after every
  few seconds of load: it must be flat after warm-up (`soak_flat`: growth under 5%), since the
  executor keeps a bounded window of records and running counters.

The load generator is a raw-HTTP/1.1 asyncio client (uvloop when installed, `http_loadgen.py`)
that costs a few microseconds per request; its own ceiling is measured against a null server that
answers from a canned buffer (same module), and reported. So is the ceiling of the executor's backend client
(`sagesched.live.transport`) against the same null server, next to `httpx.AsyncClient`'s (what
the executor used before; at 64 concurrent requests its pool made it the gateway's bottleneck).
When `wrk` is installed it also measures the closed-loop throughput of both paths as a
cross-check (`apt-get install -y wrk`).

Everything shares this machine's cores (2 here, with other work): numbers are for comparison
within one run. `added_*` are the gateway's latency minus the direct latency at the same rate.
On Linux the closed-loop rows also carry the CPU time each server process spent per request
(`cpu_us_per_request`, from /proc: `proc_meter.py`, which also samples the soak's RSS), which
varies much less than throughput on a busy machine.

This file is the orchestration: it starts the processes, runs each measurement, and assembles and
writes the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # its sibling modules, also when imported from a file path (tests/conftest.py)
    sys.path.insert(0, str(HERE))

import http_loadgen  # noqa: E402
from http_loadgen import BODY, MODEL  # noqa: E402
from proc_meter import CpuMeter, family, rss_mib  # noqa: E402

ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results" / "gateway_overhead.json"
LOADGEN = Path(http_loadgen.__file__).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the zero-latency backend (`--backend minimal`) --------------------------------------------------


def _fallback_backend_main(args: argparse.Namespace) -> None:
    """A minimal zero-latency OpenAI chat backend, used when `sagesched emulate` is unavailable."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {
                "id": "cmpl-0",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", MODEL),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
            }
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# -- orchestration -----------------------------------------------------------------------------------


def _wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy within {timeout_s} s")


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Procs:
    """Child processes, stopped (SIGTERM, then SIGKILL) when the benchmark ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_load(port: int, mode: str, *, rate: float = 0, clients: int = 64, duration: float = 5.0) -> dict[str, Any]:
    cmd = [sys.executable, str(LOADGEN), "_load", "--port", str(port), "--mode", mode, "--duration", str(duration)]
    cmd += ["--rate", str(rate), "--clients", str(clients)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 4 + 60, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_soak(port: int, pids: list[int], total: int, clients: int, chunk_s: float = 3.0) -> dict[str, Any]:
    """Drive `total` requests through the gateway in closed-loop chunks, sampling its RSS after each.

    The gateway keeps a bounded record window (executor.max_records, 10,000 by default) plus
    running counters, so its RSS should rise while that window fills and then stay flat: `growth_*`
    compares the sample at the first chunk past `warmup_requests` with the last.
    """
    samples = [{"requests": 0, "rss_mib": rss_mib(pids)}]
    done = errors = 0
    started = time.monotonic()
    while done < total:
        row = run_load(port, "closed", clients=clients, duration=chunk_s)
        done += row["requests"]
        errors += row.get("errors", 0)
        samples.append({"requests": done, "rss_mib": rss_mib(pids), "rps": row["rps"]})
    warmup = min(20_000, total // 5)
    after = next(s for s in samples if s["requests"] >= warmup)
    growth = round(samples[-1]["rss_mib"] - after["rss_mib"], 1)
    span = samples[-1]["requests"] - after["requests"]
    return {
        "requests": done,
        "errors": errors,
        "wall_s": round(time.monotonic() - started, 1),
        "warmup_requests": warmup,
        "rss_after_warmup_mib": after["rss_mib"],
        "rss_end_mib": samples[-1]["rss_mib"],
        "growth_after_warmup_mib": growth,
        "growth_per_100k_requests_mib": round(growth * 100_000 / span, 1) if span else None,
        "samples": samples,
    }


_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""


def run_wrk(port: int, connections: int, duration: float, script: Path) -> dict[str, Any] | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script)]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, timeout=duration + 60
    )
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)

    def latency(q: str) -> float | None:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return None
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return round(float(m.group(1)) * scale, 3)

    return {
        "connections": connections,
        "threads": 1,
        "rps": float(rps.group(1)) if rps else None,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def _start_backend(procs: Procs, port: int, tmp: Path, kind: str = "minimal") -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind == "minimal":
        procs.start([sys.executable, __file__, "_backend", "--port", str(port)], env, tmp / "backend.log")
        _wait_http(f"http://127.0.0.1:{port}/health", 60)
        return "minimal Starlette zero-latency app (benchmarks/gateway_overhead.py)"
    emulate = [sys.executable, "-m", "sagesched.cli", "emulate", "vllm", "--model", MODEL, "--time-scale", "0"]
    emulate += ["--port", str(port), "--log-level", "warning"]
    try:
        import sagesched.live.emulators.cli  # noqa: F401

        proc = procs.start(emulate, env, tmp / "backend.log")
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", 60)
            return "sagesched emulate vllm --time-scale 0"
        except RuntimeError:
            proc.kill()
    except ImportError:
        pass
    procs.start([sys.executable, __file__, "_backend", "--port", str(port)], env, tmp / "backend.log")
    _wait_http(f"http://127.0.0.1:{port}/health", 60)
    return "minimal Starlette zero-latency app (benchmarks/gateway_overhead.py)"


def _start_gateway(procs: Procs, backend_port: int, port: int, tmp: Path, policy: str, workers: int) -> None:
    config = tmp / "gateway.yaml"
    config.write_text(
        f"policy: {policy}\n"
        f"backends:\n  - {{url: 'http://127.0.0.1:{backend_port}', kind: llm, models: [{MODEL}], max_inflight: 512}}\n"
        "max_queue: 100000\nlog_level: warning\n"
    )
    env = {**os.environ, "SAGESCHED_STATE_DIR": str(tmp / f"state-{port}"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sagesched.cli", "inference", "start", "--config", str(config), "--port", str(port)]
    cmd += ["--workers", str(workers)]
    procs.start(cmd, env, tmp / f"gateway-{port}.log")
    _wait_http(f"http://127.0.0.1:{port}/health", 60)
    # Wait until the backend is marked healthy (first probe) so no request meets an empty pool.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("gateway never became ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--json", action="store_true", help=f"print the result JSON and write {RESULTS.relative_to(ROOT)}"
    )
    parser.add_argument("--rates", default="200,500,1000", help="open-loop rates (requests/s), comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop concurrent clients")
    parser.add_argument("--policy", default="hybrid", help="gateway policy")
    parser.add_argument(
        "--backend",
        choices=("minimal", "emulator"),
        default="minimal",
        help="zero-latency backend: the minimal Starlette app (strictest) or `sagesched emulate vllm`",
    )
    parser.add_argument("--workers", default="1", help="gateway worker counts to measure, comma-separated (e.g. 1,2)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where --json writes the result")
    parser.add_argument(
        "--soak", type=int, default=100_000, help="requests of the RSS soak through the gateway (0 skips it)"
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r]
    worker_counts = [int(w) for w in args.workers.split(",") if w]

    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            null_port, backend_port = free_port(), free_port()
            procs.start([sys.executable, str(LOADGEN), "_null", "--port", str(null_port)])
            _wait_port(null_port)
            backend = _start_backend(procs, backend_port, tmp, args.backend)
            backend_pid = procs.procs[-1].pid
            gateway_pids = {}
            gateway_ports = {}
            for w in worker_counts:
                gateway_ports[w] = free_port()
                _start_gateway(procs, backend_port, gateway_ports[w], tmp, args.policy, w)
                gateway_pids[w] = procs.procs[-1].pid
            script = tmp / "post.lua"
            script.write_text(_WRK_LUA.format(body=BODY.decode()))

            result: dict[str, Any] = {
                "benchmark": "gateway_overhead",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": _machine(),
                "backend": backend,
                "policy": args.policy,
                "request": json.loads(BODY),
                "load_generator": "raw HTTP/1.1 asyncio client in its own process ("
                + ("uvloop" if _has("uvloop") else "asyncio")
                + ")",
                "duration_s": args.duration,
            }
            ceiling = run_load(null_port, "closed", clients=args.clients, duration=args.duration)
            result["load_generator_ceiling"] = {
                "closed_loop_rps": ceiling["rps"],
                "p50_ms": ceiling["p50_ms"],
                "p99_ms": ceiling["p99_ms"],
            }
            result["load_generator_floor_open"] = run_load(null_port, "open", rate=rates[0], duration=args.duration)
            # The executor relays through its backend client: that client's ceiling bounds the gateway's.
            result["backend_client_ceiling"] = {
                "sagesched.live.transport": run_load(
                    null_port, "transport", clients=args.clients, duration=args.duration
                ),
                "httpx.AsyncClient": run_load(null_port, "httpx", clients=args.clients, duration=args.duration),
            }

            g1 = gateway_ports[worker_counts[0]]
            open_rows = []
            for rate in rates:
                direct = run_load(backend_port, "open", rate=rate, duration=args.duration)
                via = run_load(g1, "open", rate=rate, duration=args.duration)
                open_rows.append(
                    {
                        "rate": rate,
                        "direct": direct,
                        "gateway": via,
                        "added_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 3),
                        "added_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 3),
                    }
                )
            result["open_loop"] = open_rows
            with CpuMeter({"backend": [backend_pid]}) as meter:
                direct_closed = run_load(backend_port, "closed", clients=args.clients, duration=args.duration)
            meter.attach(direct_closed, direct_closed["requests"])
            closed = {"direct": direct_closed}
            for w, port in gateway_ports.items():
                with CpuMeter({"gateway": family(gateway_pids[w]), "backend": [backend_pid]}) as meter:
                    row = run_load(port, "closed", clients=args.clients, duration=args.duration)
                meter.attach(row, row["requests"])
                closed[f"gateway_workers_{w}"] = row
            result["closed_loop"] = closed
            if shutil.which("wrk"):
                wrk = {"ceiling_null_server": run_wrk(null_port, args.clients, args.duration, script)}
                wrk["direct"] = run_wrk(backend_port, args.clients, args.duration, script)
                for w, port in gateway_ports.items():
                    wrk[f"gateway_workers_{w}"] = run_wrk(port, args.clients, args.duration, script)
                result["wrk"] = wrk
            else:
                result["wrk"] = "not installed (apt-get install -y wrk)"

            result["policy_call"] = policy_call_us(args.policy)
            if args.soak:
                g = worker_counts[0]
                result["soak"] = run_soak(gateway_ports[g], family(gateway_pids[g]), args.soak, args.clients)

            headline = open_rows[0]
            gw = closed[f"gateway_workers_{worker_counts[0]}"]
            result.update(
                added_p50_ms=headline["added_p50_ms"],
                added_p99_ms=headline["added_p99_ms"],
                added_at_rate=headline["rate"],
                gateway_rps=gw["rps"],
                direct_rps=direct_closed["rps"],
                ratio=round(gw["rps"] / direct_closed["rps"], 3) if direct_closed["rps"] else None,
                targets={"added_p50_ms": 1.0, "added_p99_ms": 5.0, "ratio": 0.4},
            )
            with contextlib.suppress(OSError):
                result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            result["meets_targets"] = bool(
                result["added_p50_ms"] <= 1.0 and result["added_p99_ms"] <= 5.0 and (result["ratio"] or 0) >= 0.4
            )
            if "soak" in result:
                # Flat: after warm-up the gateway grows by less than 5% of its size (allocator noise).
                soak = result["soak"]
                result["soak_flat"] = bool(soak["growth_after_warmup_mib"] <= 0.05 * soak["rss_after_warmup_mib"])
        finally:
            procs.stop_all()

    keys = ("added_p50_ms", "added_p99_ms", "gateway_rps", "direct_rps", "ratio")
    if args.json:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    else:
        for key in keys:
            print(f"{key}: {result[key]}")
        if "soak" in result:
            soak = result["soak"]
            print(
                f"soak: {soak['requests']} requests, RSS {soak['rss_after_warmup_mib']} MiB after warm-up -> "
                f"{soak['rss_end_mib']} MiB at the end ({soak['growth_after_warmup_mib']:+} MiB)"
            )
        print(f"load generator ceiling: {result['load_generator_ceiling']['closed_loop_rps']} req/s")
        for row in open_rows:
            print(
                f"open loop {row['rate']:.0f}/s: direct p50 {row['direct']['p50_ms']} ms, gateway p50 {row['gateway']['p50_ms']} ms"
            )
    return 0


def _machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine already was."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    info["note"] = "load generator, backend and gateway share these cores with each other (and any other work)"
    return info


def policy_call_us(policy: str, repeat: int = 20_000) -> dict[str, float]:
    """Cost of one policy call in the gateway's common case (one queued chat, one idle instance):
    the policy alone and through the decision core, best of three rounds, in microseconds."""
    from sagesched.core import InstanceKind, InstanceView, Request, RequestType
    from sagesched.core.decisions import decide
    from sagesched.policies import make_policy

    pol = make_policy(policy)
    queue = [Request("a", RequestType.LLM_CHAT, MODEL, 0.0, prompt_tokens=10, max_tokens=4)]
    views = [InstanceView("i", InstanceKind.LLM, frozenset({MODEL}), max_inflight=512)]
    out: dict[str, float] = {}
    for label, call in (
        ("schedule_us", lambda: pol.schedule(0.0, queue, views)),
        ("decide_us", lambda: decide(pol, 0.0, queue, views)),
    ):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            best = min(best, (time.perf_counter() - start) / repeat * 1e6)
        out[label] = round(best, 1)
    return out


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_policy":
        print(json.dumps({"policy": sys.argv[2], **policy_call_us(sys.argv[2])}))
        raise SystemExit(0)
    if len(sys.argv) > 1 and sys.argv[1] in {"_load", "_null", "_backend"}:
        # The load generator and the null server live in http_loadgen.py (which main() starts
        # directly); their roles are still accepted here, as before the split.
        a = http_loadgen.parse_role_args()
        {**http_loadgen.ROLES, "_backend": _fallback_backend_main}[a.role](a)
        raise SystemExit(0)
    raise SystemExit(main())
