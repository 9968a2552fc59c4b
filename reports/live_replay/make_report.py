"""Reproduce reports/live_replay: the default workload, simulated and replayed live, fifo and hybrid.

    python reports/live_replay/make_report.py            # real llama-server backends (a few minutes)
    python reports/live_replay/make_report.py --emulators --out /tmp/lr   # a dry run on the emulators

What it does, in order (everything on 127.0.0.1, servers stopped after each live run):

1. composes the default experiment (workload azure_conv: the Azure 2023 conversation trace plus
   the query-embedding stream, with its classes and SLOs) with the cluster below and the scaling
   in `scaling()`, and for each policy (fifo, hybrid) runs it three times: simulated with the three
   servers sharing the machine's cores (`*_sim`), simulated with each server alone on a core
   (`*_sim_isolated`), and live (`*_live`: our executor and the same policy over fresh servers: two
   llama-server LLM instances, Gemma 3 270M, `--parallel 2` each, and one llama-server embedding
   instance, from sagesched.live.real_backends), recording the load average, the servers' CPU time,
   steps and prompt-cache hits;
2. `sagesched compare` on sim vs live per policy, and live fifo vs live hybrid;
3. writes results.md (generated tables) next to the hand-written README.md.

Both drivers read the same cluster entries: each server is an `engine: llamacpp` instance whose steps
are timed by the probe calibration shipped in sagesched/data/profiles/calibration/llamacpp/ (fitted
from probes of a lone llama-server, never from these runs), with the servers' own settings (slots,
context, batch sizes, one ggml thread).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fresh_probe  # noqa: E402  (this folder's helper, beside this script)

# The default workload, shrunk to what two CPU llama-servers can serve on a shared 2-core machine.
# The chat load was chosen *before* the final live run, from the simulator alone (calibrated from
# probes, not from any live replay): RATE_SCALE puts the two LLM servers at roughly 70-80% simulated
# utilisation, busy enough that requests queue behind the slots (so policies have something to decide)
# and not hopelessly past saturation (see README.md, "Choice of load", and `--sim-only`).
RATE_SCALE = 0.6
DURATION_S = 48.0
EMBEDDING_RPS = 0.4  # query embeddings per second, kept at the earlier run's rate (one slow CPU slot)


def scaling(
    rate_scale: float = RATE_SCALE,
    duration_s: float = DURATION_S,
    embedding_rps: float = EMBEDDING_RPS,
    slo_scale: float = 1.0,
) -> list[str]:
    return [
        *slo_scaling(slo_scale),
        f"workload.rate_scale={rate_scale}",  # x the trace's arrival rate
        f"workload.duration_s={duration_s}",  # the trace's first seconds, stretched by 1/rate_scale
        "+workload.lengths.max_prompt_tokens=128",  # clip prompts (trace mean ~1,000 tokens)
        "+workload.lengths.max_output_tokens=16",  # clip outputs (trace mean ~200 tokens)
        # The stream's rate is multiplied by rate_scale; this keeps it at EMBEDDING_RPS.
        f"workload.embedding.stream_rps={embedding_rps / rate_scale:.6g}",
        "model.llm=gemma-3-270m",  # the model the llama-servers serve
        "model.embedding=gemma-3-270m-embed",  # the same GGUF as an --embeddings server
    ]


# The workload's class SLOs (conf/workload/azure_conv.yaml), for `--match-load`'s scaling.
SLOS = {
    "interactive": {"ttft_ms": 500, "tpot_ms": 50},
    "standard": {"ttft_ms": 2000, "tpot_ms": 100},
    "batch": {"e2e_ms": 120000},
    "query_embedding": {"e2e_ms": 100},
}


def slo_scaling(factor: float) -> list[str]:
    """Overrides multiplying every class SLO by `factor` (none at 1)."""
    if factor == 1.0:
        return []
    return [f"workload.classes.{c}.{k}={v * factor:.6g}" for c, slo in SLOS.items() for k, v in slo.items()]


LLM_DEFAULT = LLM_CALIBRATION = "gemma-3-270m-q4km-xeon-2cpu-t1"
EMBEDDING_DEFAULT = EMBEDDING_CALIBRATION = "gemma-3-270m-q4km-xeon-2cpu-t1-embedding"
REQUEST_TIMEOUT_S = 120.0  # a request unfinished 2 min after its arrival fails (the batch class's SLO)


def live_args(slowdown: float = 1.0) -> list[str]:
    """The live driver's overrides; the timeout stretches with a matched load's SLOs (`--match-load`)."""
    return [f"driver.request_timeout_s={REQUEST_TIMEOUT_S * max(1.0, slowdown):.6g}"]


POLICIES = ("fifo", "hybrid")


HOST_CPUS: int | None = None  # --host-cpus; None: this process's CPU affinity


def host_cpus() -> int:
    """The cores the servers share: --host-cpus, else this process's CPU affinity (2 on the report's
    machine; a bigger machine runs the shared-host simulation with its own count unless told)."""
    return HOST_CPUS if HOST_CPUS is not None else len(os.sched_getaffinity(0))


# URLs for simulated runs: the cluster entries need one, and the simulator never contacts it.
PLACEHOLDER = (["http://127.0.0.1:1", "http://127.0.0.1:2"], "http://127.0.0.1:3")


def cluster_config(
    llm_urls: list[str],
    embedding_url: str,
    llm_slots: int,
    shared_host: bool = True,
    calibrations: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Two LLM llama-servers and one --embeddings llama-server, each naming its URL (live) and its
    llama.cpp engine model (sim): the same entries drive both drivers. `shared_host`: the three
    one-thread servers share this machine's cores (`llamacpp.host`); False models each alone on a
    core, as its calibration was probed. `calibrations`: (LLM, embedding) calibration names or files
    (default: `LLM_CALIBRATION`, `EMBEDDING_CALIBRATION`)."""
    llm_calibration, embedding_calibration = calibrations or (LLM_CALIBRATION, EMBEDDING_CALIBRATION)
    host = {"host": "local", "host_cpus": host_cpus()} if shared_host else {}
    instances = [
        {
            "id": "llm",
            "count": 2,
            "kind": "llm",
            "url": llm_urls,
            "model": "${model.llm}",
            "max_inflight": 2 * llm_slots,
            "engine": "llamacpp",
            # as real_backends starts them: -np llm_slots, -c 2048 per slot, -b 2048 -ub 512, -t 1
            "llamacpp": {"calibration": llm_calibration, "n_parallel": llm_slots, **host},
        },
        {
            "id": "emb",
            "kind": "embedding",
            "url": embedding_url,
            "embedding_model": "${model.embedding}",
            "max_inflight": 8,
            "engine": "llamacpp",
            # --embeddings --pooling mean, one slot, -c 2048 -b 2048 -ub 2048, -t 1
            "llamacpp": {"calibration": embedding_calibration, "n_parallel": 1, **host},
        },
    ]
    return {"instances": instances}


def compose(overrides: list[str], cluster: dict[str, Any]) -> Any:
    """The experiment config for `overrides`, with `cluster` in place of the cluster group."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from sagesched.experiment import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = hydra_compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.cluster = OmegaConf.create(cluster)
    return cfg


@contextlib.contextmanager
def backends(emulators: bool, llm_slots: int):
    """(llm urls, embedding url, description, {group: [(pid, url)]} of llama-servers) of running
    servers; stopped on exit."""
    stack = contextlib.ExitStack()
    with stack:
        if emulators:
            from sagesched.live.emulators.runner import start_emulator

            llms = [stack.enter_context(start_emulator("vllm", model="gemma-3-270m", time_scale=1.0)) for _ in range(2)]
            emb = stack.enter_context(start_emulator("tei", model="all-minilm-l6-v2"))
            yield [s.url for s in llms], emb.url, "emulators (sagesched emulate vllm/tei)", {}
        else:
            from sagesched.live import real_backends as rb

            # One ggml thread per server: three servers share two cores with other work, and ggml's
            # spinning workers made 2 threads each several times slower (real_backends.default_threads).
            os.environ.setdefault("SAGESCHED_LLAMA_THREADS", "1")

            llms = [stack.enter_context(rb.start_llama_server(parallel=llm_slots)) for _ in range(2)]
            emb = stack.enter_context(rb.start_llama_server(embeddings=True, parallel=1))
            servers = {"llm": [(s.pid, s.url) for s in llms], "emb": [(emb.pid, emb.url)]}
            yield [s.url for s in llms], emb.url, f"llama-server ({' '.join(llms[0].command[1:])})", servers


METRICS = (
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "e2e_p99_ms",
    "embedding_p50_ms",
    "embedding_p99_ms",
    "slo_attainment",
    "goodput_rps",
)
CLASSES = ("interactive", "standard", "batch", "query_embedding")


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def utilisation(summary: dict[str, Any]) -> str:
    """Simulated busy share per instance (the sim summary's per-instance stats), else '–'."""
    stats = ((summary.get("sim") or {}).get("instances")) or {}
    return ", ".join(f"{k} {v['utilization']:.2f}" for k, v in sorted(stats.items()) if "utilization" in v) or "–"


def direction(fifo: float | None, hybrid: float | None) -> int | None:
    """+1 / -1 when hybrid's value is more than 1% above / below fifo's, 0 within 1%, None if missing."""
    if fifo is None or hybrid is None:
        return None
    scale = max(abs(fifo), 1e-12)
    if abs(hybrid - fifo) <= 0.01 * scale:
        return 0
    return 1 if hybrid > fifo else -1


ARROW = {1: "up", -1: "down", 0: "=", None: "–"}  # `direction`'s values, as the tables write them


def figure(summary: dict[str, Any] | None, key: str | tuple[str, ...]) -> float | None:
    """`summary[key]` (a tuple: a path into nested sections) as a float, None where missing."""
    d: Any = summary
    for k in (key,) if isinstance(key, str) else key:
        d = (d or {}).get(k)
    return None if d is None else float(d)


def pct(a: float | None, b: float | None) -> str:
    """a / b - 1 as a signed percentage, '–' where either is missing."""
    return "–" if a is None or b is None or b == 0 else f"{100 * (a / b - 1):+.1f}%"


def num(v: float | None) -> str:
    return "–" if v is None else (f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}")


def error_tables(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Sim vs live per metric and policy, and hybrid vs fifo in each driver (the direction check)."""

    def get(name: str, key: str | tuple[str, ...]) -> float | None:
        return figure(summaries.get(name), key)

    lines = [
        "## Sim vs live per metric (error = sim / live - 1)",
        "",
        "`sim` models the three servers sharing the machine's cores (`llamacpp.host`); `isolated` models each",
        "alone on a core, as its calibration was probed.",
        "",
        "| metric | fifo live | fifo sim | error | fifo isolated | error | hybrid live | hybrid sim | error |"
        " hybrid isolated | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        cells = []
        for p in POLICIES:
            live = get(f"{p}_live", m)
            cells.append(num(live))
            for variant in ("sim", "sim_isolated"):
                v = get(f"{p}_{variant}", m)
                cells += [num(v), pct(v, live)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Hybrid vs fifo in each driver (change = hybrid / fifo - 1)",
        "",
        "Direction: up / down when hybrid is more than 1% above / below fifo, `=` within 1%.",
        "",
        "| metric | live fifo | live hybrid | live change | sim fifo | sim hybrid | sim change | sim vs live |"
        " isolated change | isolated vs live |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: list[tuple[str, str | tuple[str, ...]]] = (
        [(m, m) for m in METRICS]
        + [(f"{c} attainment", ("classes", c, "slo_attainment")) for c in CLASSES]
        + [(f"{c} TTFT p99", ("classes", c, "ttft_p99_ms")) for c in ("interactive", "standard", "batch")]
        + [("rejected (shed)", "rejected")]
    )

    def verdict(a: int | None, b: int | None) -> str:
        if a is None or b is None:
            return "–"
        return f"{'same' if a == b else 'differs'} ({ARROW[a]} / {ARROW[b]})"

    for label, key in rows:
        lf, lh = get("fifo_live", key), get("hybrid_live", key)
        sf, sh = get("fifo_sim", key), get("hybrid_sim", key)
        xf, xh = get("fifo_sim_isolated", key), get("hybrid_sim_isolated", key)
        live_dir = direction(lf, lh)
        lines.append(
            f"| {label} | {num(lf)} | {num(lh)} | {pct(lh, lf)} | {num(sf)} | {num(sh)} | {pct(sh, sf)} | "
            f"{verdict(direction(sf, sh), live_dir)} | {pct(xh, xf)} | {verdict(direction(xf, xh), live_dir)} |"
        )
    return lines


def server_work(servers: dict[str, list[tuple[int, str]]]) -> dict[str, float]:
    """Per server group: CPU seconds of its llama-server processes and their steps (`n_decode_total`)."""
    import psutil

    from sagesched.calibrate.llamacpp_sweep import process_cpu_s, server_counters

    me = psutil.Process().cpu_times()  # this process: the live driver (executor, policy, sender)
    m = psutil.cpu_times()  # the whole machine (/proc/stat), all processes
    out: dict[str, float] = {
        "wall_s": time.monotonic(),
        "replay_cpu_s": float(me.user + me.system),
        "machine_busy_s": float(m.user + m.nice + m.system + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)),
        "machine_idle_s": float(m.idle + getattr(m, "iowait", 0.0)),
        "machine_steal_s": float(getattr(m, "steal", 0.0)),
    }
    for group, procs in servers.items():
        out[f"{group}_cpu_s"] = sum(process_cpu_s(pid) for pid, _ in procs)
        counters = [server_counters(url) for _, url in procs]
        out[f"{group}_steps"] = sum(c.get("n_decode_total", 0.0) for c in counters)
        out[f"{group}_cached"] = sum(c.get("prompt_tokens_cached_total", 0.0) for c in counters)
    return out


def work_table(summaries: dict[str, dict[str, Any]], work: dict[str, dict[str, float]]) -> list[str]:
    """The servers' work in each live run beside the simulated work of the same policy: CPU seconds
    against simulated busy seconds (isolated: the calibrated step times, no sharing), and steps."""
    if not work:
        return []
    lines = [
        "## Work: live servers' CPU time and steps vs simulated",
        "",
        "Live: CPU seconds (user + system, all threads) of the llama-server processes during the run and their"
        " `llama_decode` calls (`/metrics` n_decode_total). Simulated: busy seconds (utilisation x simulated"
        " time) and steps; `isolated` busy time is the calibrated step time alone, `sim` includes the"
        " shared-host stretch.",
        "",
        "| policy | servers | live CPU s | sim isolated busy s | sim busy s | live steps | sim steps | isolated steps |"
        " live prompt tokens from cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in POLICIES:
        if f"{p}_live" not in work:
            continue
        w = work[f"{p}_live"]
        for group, prefix in (("llm", "llm-"), ("emb", "emb")):
            cells = []
            for variant in ("sim_isolated", "sim"):
                st = summaries[f"{p}_{variant}"].get("sim") or {}
                steps = sum(v.get("steps", 0) for k, v in (st.get("instances") or {}).items() if k.startswith(prefix))
                cells.append((fresh_probe.busy_s(summaries[f"{p}_{variant}"], prefix), steps))
            lines.append(
                f"| {p} | {group} | {w[f'{group}_cpu_s']:.1f} | {cells[0][0]:.1f} | {cells[1][0]:.1f} | "
                f"{w[f'{group}_steps']:.0f} | {cells[1][1]} | {cells[0][1]} | {w[f'{group}_cached']:.0f} |"
            )
    lines += [
        "",
        f"Where the machine's {host_cpus()} cores went during each live run (average cores over its wall time;"
        " machine busy and idle from /proc/stat, other processes = machine busy - ours):",
        "",
        "| policy | wall s | LLM servers | embedding server | live driver (this process) | other processes |"
        " idle | stolen by the hypervisor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in POLICIES:
        w = work.get(f"{p}_live")
        if not w:
            continue
        wall = w["wall_s"]
        llm, emb, me, busy, idle, steal = (
            w[k] / wall
            for k in ("llm_cpu_s", "emb_cpu_s", "replay_cpu_s", "machine_busy_s", "machine_idle_s", "machine_steal_s")
        )
        lines.append(
            f"| {p} | {wall:.0f} | {llm:.2f} | {emb:.2f} | {me:.2f} | {busy - llm - emb - me:.2f} | {idle:.2f} |"
            f" {steal:.2f} |"
        )
    return lines


def matched_slowdown(
    rate_scale: float, duration_s: float, llm_slots: int, folder: Path, calibrations: tuple[str, str] | None = None
) -> float:
    """`fresh_probe.speed_ratio` for this report's workload: fifo on isolated servers, simulated under
    the shipped calibrations and under `calibrations` (default: `LLM_CALIBRATION`, `EMBEDDING_CALIBRATION`)."""
    from sagesched.experiment import run

    current = calibrations or (LLM_CALIBRATION, EMBEDDING_CALIBRATION)
    runs = itertools.count()

    def simulate(calibrations: tuple[str, str], slowdown: float = 1.0) -> dict[str, Any]:
        cluster = cluster_config(*PLACEHOLDER, llm_slots, shared_host=False, calibrations=calibrations)
        load = scaling(rate_scale / slowdown, duration_s, EMBEDDING_RPS / slowdown, slowdown)
        overrides = ["policy=fifo", *load, "driver=sim"]
        return run(compose(overrides, cluster), folder / f"run{next(runs)}", progress=False)

    return fresh_probe.speed_ratio(lambda: simulate((LLM_DEFAULT, EMBEDDING_DEFAULT)), lambda r: simulate(current, r))


def main(argv: list[str] | None = None) -> int:
    global HOST_CPUS, LLM_CALIBRATION, EMBEDDING_CALIBRATION
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulators", action="store_true", help="use the emulators instead of llama-server (dry run)")
    parser.add_argument("--out", default=str(HERE), help="report folder (default: this folder)")
    parser.add_argument("--llm-slots", type=int, default=2, help="llama-server --parallel per LLM instance")
    parser.add_argument("--rate-scale", type=float, default=RATE_SCALE, help="x the trace's chat arrival rate")
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds of the trace replayed")
    parser.add_argument(
        "--sim-only", action="store_true", help="simulate only (no servers): print utilisation and latencies per policy"
    )
    parser.add_argument(
        "--view-rates",
        choices=("nominal", "learned"),
        default="nominal",
        help="the rates the simulated policy's views carry (sim.view_rates; learned: as the live executor)",
    )
    parser.add_argument(
        "--host-cpus", type=int, default=None, help="cores the simulated servers share (default: affinity)"
    )
    parser.add_argument(
        "--llm-calibration",
        default=LLM_DEFAULT,
        help="the chat servers' llama.cpp calibration: a shipped name or a file (`sagesched calibrate llamacpp`)",
    )
    parser.add_argument("--embedding-calibration", default=EMBEDDING_DEFAULT, help="the embedding server's, likewise")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="probe fresh servers first (about 2 min) and time the simulation by their calibrations"
        " (written to <out>/calibration/; fresh_probe.py)",
    )
    parser.add_argument(
        "--match-load",
        action="store_true",
        help="divide the arrival rates by the servers' slowdown against the shipped calibration (the same"
        " requests, stretched in time, at the designed utilisation); with --calibrate or calibration files",
    )
    args = parser.parse_args(argv)
    HOST_CPUS = args.host_cpus

    from sagesched.experiment import run
    from sagesched.replay.compare import compare

    if args.emulators and (args.calibrate or args.match_load):
        parser.error("--calibrate and --match-load are about llama-servers' speed; drop --emulators")
    if args.calibrate:
        if (args.llm_calibration, args.embedding_calibration) != (LLM_DEFAULT, EMBEDDING_DEFAULT):
            parser.error("--calibrate probes its own calibrations: drop --llm-calibration/--embedding-calibration")
        args.llm_calibration, args.embedding_calibration = fresh_probe.probe_servers(Path(args.out) / "calibration")
    LLM_CALIBRATION, EMBEDDING_CALIBRATION = args.llm_calibration, args.embedding_calibration
    slowdown = 1.0
    if args.match_load:
        if (args.llm_calibration, args.embedding_calibration) == (LLM_DEFAULT, EMBEDDING_DEFAULT):
            parser.error("--match-load compares a fresh calibration with the shipped one: add --calibrate")
        with tempfile.TemporaryDirectory(prefix="match_load_") as scratch:
            slowdown = matched_slowdown(args.rate_scale, args.duration, args.llm_slots, Path(scratch))
        print(f"servers {slowdown:.3f}x as busy as under the shipped calibration: arrival rates / {slowdown:.3f}")
    scaling_args = scaling(args.rate_scale / slowdown, args.duration, EMBEDDING_RPS / slowdown, slowdown)
    sim_args = [f"sim.view_rates={args.view_rates}"]
    if args.sim_only:
        for shared in (True, False):
            cluster = cluster_config(*PLACEHOLDER, args.llm_slots, shared)
            for policy in POLICIES:
                overrides = [f"policy={policy}", *scaling_args, "driver=sim", *sim_args]
                s = run(compose(overrides, cluster), Path(args.out), progress=False)
                print(
                    f"{policy} ({'shared host' if shared else 'isolated'}): {s['llm_requests']} chats, "
                    f"{s['embedding_requests']} embeddings over {s['duration_s']:.0f}s; utilisation {utilisation(s)}; "
                    f"TTFT p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms, e2e p99 {s['e2e_p99_ms']:.0f} ms, "
                    f"attainment {s['slo_attainment']:.3f}, goodput {s['goodput_rps']:.3f}/s, rejected {s['rejected']}"
                )
        return 0
    out = Path(args.out)
    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    summaries: dict[str, dict[str, Any]] = {}
    conditions: list[str] = [f"load average at the start: {load_average()}"]
    work: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        for variant in ("sim", "sim_isolated"):
            name = f"{policy}_{variant}"
            print(f"== {name}", flush=True)
            cluster = cluster_config(*PLACEHOLDER, args.llm_slots, variant == "sim")
            summaries[name] = run(
                compose([f"policy={policy}", *scaling_args, "driver=sim", *sim_args], cluster),
                runs / name,
                progress=False,
            )
        # Fresh servers for each live run: a server's slots keep the prompts of the previous run's last
        # requests (the prompt cache), which would hand the second policy's first requests a head start.
        name = f"{policy}_live"
        with backends(args.emulators, args.llm_slots) as (llm_urls, embedding_url, what, servers):
            cluster = cluster_config(llm_urls, embedding_url, args.llm_slots)
            before = load_average()
            started = time.strftime("%H:%M:%S UTC", time.gmtime())
            print(f"== {name} (load average {before})", flush=True)
            counters0 = server_work(servers)
            summaries[name] = run(
                compose([f"policy={policy}", *scaling_args, "driver=live", *live_args(slowdown)], cluster),
                runs / name,
                progress=False,
            )
            if servers:
                after = server_work(servers)
                work[name] = {k: after[k] - counters0[k] for k in after}
            conditions.append(f"{name}: started {started}, load average before {before}, after {load_average()}")
    texts = []
    for a, b in [(f"{p}_sim", f"{p}_live") for p in POLICIES] + [("fifo_live", "hybrid_live")]:
        folder = out / "compare" / f"{a}__vs__{b}"
        texts.append(compare(runs / a, runs / b, folder, labels=[a, b]).replace("![latency CDFs](cdf.png)", ""))
        texts.append(f"![latency CDFs](compare/{folder.name}/cdf.png)")
    live = summaries["hybrid_live"]
    header = [
        "# Live replay results (generated by make_report.py; prose in README.md)",
        "",
        f"Backends: {what}. Requests per run: {live['requests']} "
        f"({live['llm_requests']} chat, {live['embedding_requests']} embedding).",
        f"Scaling of the default workload: `{' '.join(scaling_args)}`"
        + (
            f" (`--match-load`: rates divided by {slowdown:.3f}, the servers' simulated slowdown under the"
            " calibrations below against the shipped ones)."
            if args.match_load
            else "."
        ),
        *(
            ["Calibrations probed just before the runs (`--calibrate`): `calibration/` in this folder."]
            if args.calibrate
            else []
        ),
        "Simulated: the same cluster entries, `engine: llamacpp` with the probe calibrations "
        f"`{LLM_CALIBRATION}` and `{EMBEDDING_CALIBRATION}` (view rates: {args.view_rates}); `*_sim`: the three servers share the "
        f"machine's {host_cpus()} cores (`llamacpp.host`), `*_sim_isolated`: each alone on a core.",
        "",
        "Machine (2 cores, shared with other users' jobs): " + "; ".join(conditions) + ".",
        "",
        "| run | completed | rejected | failed | TTFT p50 | TTFT p99 | TPOT p50 | e2e p99 | embedding p99 | SLO att. |"
        " goodput/s | send lateness p99 | prompt mismatches | simulated utilisation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: Any, fmt: str = "{:.0f}") -> str:
        return "–" if value is None else fmt.format(value)

    for name, s in summaries.items():
        header.append(
            f"| {name} | {s['completed']} | {s['rejected']} | {s['failed']} | {cell(s.get('ttft_p50_ms'))} | "
            f"{cell(s.get('ttft_p99_ms'))} | {cell(s.get('tpot_p50_ms'), '{:.1f}')} | {cell(s.get('e2e_p99_ms'))} | "
            f"{cell(s.get('embedding_p99_ms'), '{:.1f}')} | {cell(s.get('slo_attainment'), '{:.3f}')} | "
            f"{cell(s.get('goodput_rps'), '{:.3f}')} | "
            f"{cell(s.get('send_lateness_p99_ms'), '{:.2f}')} | {cell(s.get('prompt_token_mismatches'))} | "
            f"{utilisation(s)} |"
        )
    header += ["", "Latencies in ms.", "", *error_tables(summaries), "", *work_table(summaries, work), ""]
    header += ["Each comparison below: A = first run, B = second.", ""]
    (out / "results.md").write_text("\n".join(header + [t.replace("\n# ", "\n## ") for t in texts]) + "\n")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
