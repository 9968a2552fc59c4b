"""Capacity at equal SLO attainment: the highest load each policy sustains while meeting a target.

    python experiments/policy_benchmark/capacity.py                  # 4 scenarios x 6 policies x 2 seeds x 2 criteria
    python experiments/policy_benchmark/capacity.py --scenarios rag --policies fifo,hybrid --seeds 1
    python experiments/policy_benchmark/capacity.py --scenarios mvs_embedding_heavy --policies hybrid \
        --layouts silo_3llm_1tei/none,silo_2llm_2tei/none,all_mixed_4/mps   # -> capacity_mvs.md

The per-cell tables compare goodput at four fixed loads. Serving papers compare capacity instead:
the largest request rate a system sustains while a given fraction of requests meets its SLOs
(DistServe's "per-GPU goodput" at 90% attainment; SLOs-Serve and QLM report capacity at equal
SLOs). This script finds that rate for each (scenario, policy, seed) by search over
`workload.rate_scale`, so the report can state hybrid's gain in the field's own unit.

Two criteria, each searched on its own (they share probes): 90% of all requests (`all`), and 90%
of each request type (`every_type`: LLM chats and embeddings apart, the worst type decides). The
second matters where one type dominates the count: in the embedding-heavy scenario chats are ~8% of
the requests, so a policy that serves every embedding and drops the chats still meets 90% of all.

Sustained, not burst: the benchmark cells compress a fixed trace window by `rate_scale`, so a higher
rate is a shorter run, and a queue built in a short burst drains after it (an over-statement of
capacity that grows with the rate). Above 1x the trace window here grows with the rate instead
(`workload.duration_s` = the scenario's window x rate_scale), so the arrivals span the same
wall-clock time as the scenario's 1x run; below 1x the window stays the scenario's (a shorter one
would hold only a few of the code trace's bursts, or none), so the run is longer. Attainment counts
every request, refused ones as misses, so shedding cannot raise it.

The search: the rate doubles (or halves) from 1x until attainment crosses the target, then the
bracket is bisected geometrically until its ends are within `--tolerance` (4%); the capacity is the
bracket's lower end, a rate at which the target was met (its upper end missed it). The search
stops at `--max-rate` (8x): a policy still meeting the target there gets that rate, marked capped. Attainment need
not fall monotonically with the rate; the search finds a crossing, and `capacity.csv` holds every
probe so that any non-monotone stretch shows. Where the trace ends before the window does (seed 2's
window starts at 2400 s of an hour-long trace), the search stops at the last rate the trace can fill
and the capacity is a lower bound (`capped`).

Writes `capacity.csv` (every probe) and `capacity.md` (capacity per seed, its mean, and the ratio to
FIFO's paired by seed) into `--out`. Each probe is one `python -m sagesched.experiment` run in a
temporary folder, `--jobs` at a time; results are identical for identical arguments (the simulator
is deterministic), so the files are reproducible.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # its sibling `analyze`, also when loaded from a file path (tests/conftest.py)
    sys.path.insert(0, str(HERE))

from analyze import SHED_CODES  # noqa: E402  (what the report counts as shed, defined once)

SCENARIOS = ("azure_code", "azure_conv", "rag", "embedding_heavy")
# Mixed versus siloed at equal GPU count (conf/benchmark/mvs_*.yaml): searched per layout with
# `--layouts CLUSTER/INTERFERENCE,...`, each (policy, layout) one row labelled ``policy@layout``.
MVS_SCENARIOS = ("mvs_embedding_heavy", "mvs_rag")
POLICIES = ("fifo", "priority", "slo_aware", "adaptive", "least_loaded", "hybrid")
# The Azure traces are about an hour long (conversation 3,545 s, code 3,436 s of arrivals); a
# window past the end would hold fewer requests than its rate promises.
TRACE_END_S = {
    "azure_code": 3436.0,
    "azure_conv": 3545.0,
    "rag": 3545.0,
    "embedding_heavy": 3545.0,
    "mvs_embedding_heavy": 3545.0,
    "mvs_rag": 3545.0,
}


@dataclass(frozen=True)
class Probe:
    """One run: the load it offered and what it attained."""

    scenario: str
    policy: str
    seed: int
    rate_scale: float
    duration_s: float
    requests: int
    slo_attainment: float
    worst_type_attainment: float  # the lowest attainment of any request type (LLM chat, embedding, ...)
    goodput_rps: float
    shed: int

    def attainment(self, criterion: str) -> float:
        """The attainment `criterion` judges: all requests together, or the worst request type."""
        return self.slo_attainment if criterion == "all" else self.worst_type_attainment


@functools.cache
def scenario_window(scenario: str, seed: int) -> tuple[float, float]:
    """(window start, window length) of `scenario` for `seed`, from its benchmark config."""
    cfg = yaml.safe_load((HERE / "conf" / "benchmark" / f"{scenario}.yaml").read_text())
    starts = cfg["window_starts_s"]
    return float(starts[seed % len(starts)]), float(cfg["workload"]["duration_s"])


def run_probe(scenario: str, policy: str, seed: int, rate: float) -> Probe:
    """One simulated run at `rate` x the trace rate over the scenario's window, `rate` x as long above 1x."""
    _, window = scenario_window(scenario, seed)
    duration = window * max(1.0, rate)
    name, _, layout = policy.partition("@")
    overrides = []
    if layout:  # a mixed-versus-siloed row: `policy@cluster/interference`
        cluster, _, interference = layout.partition("/")
        overrides = [f"cluster={cluster}", f"interference={interference or 'none'}"]
    with tempfile.TemporaryDirectory(prefix="capacity-") as out:
        cmd = [
            sys.executable,
            "-m",
            "sagesched.experiment",
            "--config-dir",
            str(HERE / "conf"),
            f"+benchmark={scenario}",
            f"policy={name}",
            *overrides,
            f"seed={seed}",
            f"workload.rate_scale={rate!r}",
            f"workload.duration_s={duration!r}",
            "sim.progress=false",
            f"hydra.run.dir={out}",
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"probe failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    reasons = summary.get("rejections_by_reason") or {}
    shed = sum(int(n) for reason, n in reasons.items() if reason.startswith(SHED_CODES))
    return Probe(
        scenario,
        policy,
        seed,
        rate,
        duration,
        int(summary["requests"]),
        float(summary["slo_attainment"]),
        min(float(v) for v in summary["slo_attainment_by_type"].values()),
        float(summary["goodput_rps"]),
        shed,
    )


def search_capacity(
    probe: Callable[[float], Probe], target: float, max_rate: float, tolerance: float = 1.04, criterion: str = "all"
) -> tuple[float, bool, list[Probe]]:
    """The highest rate found meeting `target` attainment, whether `max_rate` capped it, the probes."""
    probes: list[Probe] = []

    def meets(rate: float) -> bool:
        result = probe(rate)
        probes.append(result)
        return result.attainment(criterion) >= target

    rate = min(1.0, max_rate)
    if meets(rate):
        low, high = rate, None
        while high is None:
            if low >= max_rate:
                return low, True, probes
            nxt = min(low * 2.0, max_rate)
            if meets(nxt):
                low = nxt
            else:
                high = nxt
    else:
        low, high = None, rate
        while low is None:
            nxt = high / 2.0
            if nxt < 1 / 64:
                return 0.0, False, probes
            if meets(nxt):
                low = nxt
            else:
                high = nxt
    while high / low > tolerance:
        mid = math.sqrt(low * high)
        if meets(mid):
            low = mid
        else:
            high = mid
    return low, False, probes


class ProbeCache:
    """Finished probes in a CSV, appended as each finishes and read back on the next run.

    A probe is deterministic in (scenario, policy, seed, rate), so a search interrupted (or widened)
    is resumed without re-running what it already knows; a sustained embedding-heavy probe at 8x
    (~28,700 requests) takes about five minutes on a 2-core machine.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.known: dict[tuple[str, str, int, str], Probe] = {}
        if path.exists():
            for row in pd.read_csv(path).to_dict("records"):
                probe = Probe(**row)
                self.known[self._key(probe.scenario, probe.policy, probe.seed, probe.rate_scale)] = probe

    @staticmethod
    def _key(scenario: str, policy: str, seed: int, rate: float) -> tuple[str, str, int, str]:
        return scenario, policy, int(seed), f"{rate:.12g}"

    def probe(self, scenario: str, policy: str, seed: int, rate: float) -> Probe:
        key = self._key(scenario, policy, seed, rate)
        with self.lock:
            if key in self.known:
                return self.known[key]
        result = run_probe(scenario, policy, seed, rate)
        with self.lock:
            self.known[key] = result
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame([asdict(result)]).to_csv(self.path, mode="a", header=new, index=False)
        return result


def _search(
    cache: ProbeCache,
    scenario: str,
    policy: str,
    seed: int,
    criterion: str,
    target: float,
    tolerance: float,
    max_rate: float,
) -> dict:
    start, window = scenario_window(scenario, seed)
    max_rate = min(max_rate, (TRACE_END_S[scenario] - start) / window)
    capacity, capped, probes = search_capacity(
        lambda rate: cache.probe(scenario, policy, seed, rate), target, max_rate, tolerance, criterion
    )
    print(f"{scenario} {policy} seed {seed} ({criterion}): {capacity:.3f}x{' (capped)' if capped else ''}", flush=True)
    return {
        "scenario": scenario,
        "policy": policy,
        "seed": seed,
        "criterion": criterion,
        "capacity": capacity,
        "capped": capped,
        "probes": probes,
    }


def capacity_table(found: pd.DataFrame) -> pd.DataFrame:
    """Per (scenario, policy): capacity per seed, mean, and the mean over seeds of capacity / FIFO's."""
    fifo = found[found.policy == "fifo"].set_index(["scenario", "seed"]).capacity
    found = found.assign(
        vs_fifo=[
            c / fifo.get((s, d), math.nan) for c, s, d in zip(found.capacity, found.scenario, found.seed, strict=True)
        ]
    )
    rows = []
    for (scenario, policy), group in found.groupby(["scenario", "policy"], sort=False):
        group = group.sort_values("seed")
        rows.append(
            {
                "scenario": scenario,
                "policy": policy,
                "capacity_by_seed": " / ".join(
                    f"{c:.2f}{'+' if k else ''}" for c, k in zip(group.capacity, group.capped, strict=True)
                ),
                "capacity": group.capacity.mean(),
                "vs_fifo": group.vs_fifo.mean(),
                "worst_seed_vs_fifo": group.vs_fifo.min(),
            }
        )
    table = pd.DataFrame(rows)
    best = table.groupby("scenario").capacity.transform("max")
    table = table.assign(vs_best=table.capacity / best)
    silo = found[found.policy.str.contains("@silo_")]
    if len(silo):
        # Mixed versus siloed: each row's capacity over the best siloed layout's (the `silo_*` clusters,
        # any policy), per seed.
        best_silo = silo.groupby(["scenario", "seed"]).capacity.max()
        ratio = found.assign(
            r=[
                c / best_silo.get((s, d), math.nan)
                for c, s, d in zip(found.capacity, found.scenario, found.seed, strict=True)
            ]
        )
        by_row = ratio.groupby(["scenario", "policy"]).r
        table = table.merge(
            pd.DataFrame({"vs_best_silo": by_row.mean(), "worst_seed_vs_best_silo": by_row.min()}).reset_index(),
            on=["scenario", "policy"],
        )
    return table.sort_values(["scenario", "capacity"], ascending=[True, False])


CRITERIA = {
    "all": "of all requests together",
    "every_type": "of each request type (LLM chats and embeddings counted apart; the worst type decides)",
}


def write_report(
    found: pd.DataFrame, probes: pd.DataFrame, out: Path, target: float, command: str, name: str = "capacity"
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    probes.drop_duplicates().sort_values(["scenario", "policy", "seed", "rate_scale"]).to_csv(
        out / f"{name}.csv", index=False
    )
    lines = [
        f"# Capacity at {target:.0%} SLO attainment (written by experiments/policy_benchmark/capacity.py)",
        "",
        f"Command: `{command}`. The highest `rate_scale` (x the trace's request rate) at which a policy meets",
        f"every SLO of at least {target:.0%} of the requests (refused ones count as misses), with the trace window",
        "growing with the rate above 1x so that arrivals span the scenario's 1x run time (sustained load, not a",
        f"compressed burst). Found by doubling then geometric bisection to within 4%; `{name}.csv` has every",
        "probe. `+`: the search reached `--max-rate` or the trace's end, so the capacity is at least that. `vs_fifo`: the",
        "mean over seeds of capacity / FIFO's in the same seed; `vs_best`: mean capacity over the scenario's best.",
    ]
    if found.policy.str.contains("@").any():
        lines += [
            "Rows `policy@cluster/interference`: the policy on that 4-GPU layout under that shared-GPU preset",
            "(conf/cluster, conf/benchmark/mvs_*.yaml). `vs_best_silo`: the mean over seeds of capacity over the best",
            "siloed layout's (any policy) in the same seed; `worst_seed_vs_best_silo`: its minimum.",
        ]
    for criterion, what in CRITERIA.items():
        table = capacity_table(found[found.criterion == criterion])
        if table.empty:
            continue
        columns = {"capacity_by_seed": "capacity by seed", "capacity": "mean capacity"}
        if table.vs_fifo.notna().any():  # (no plain `fifo` row to pair with in a layouts-only run)
            columns |= {"vs_fifo": "vs_fifo", "worst_seed_vs_fifo": "worst seed vs_fifo"}
        columns["vs_best"] = "vs_best"
        if "vs_best_silo" in table:
            columns |= {"vs_best_silo": "vs_best_silo", "worst_seed_vs_best_silo": "worst seed vs_best_silo"}
        lines += [
            "",
            f"## {target:.0%} {what}",
            "",
            "| scenario | policy | " + " | ".join(columns.values()) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        for row in table.to_dict("records"):
            cells = [
                row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" if c == "vs_best" else f"{row[c]:.2f}"
                for c in columns
            ]
            lines.append(f"| {row['scenario']} | {row['policy']} | " + " | ".join(cells) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--target", type=float, default=0.9, help="SLO attainment to sustain (default 0.9)")
    parser.add_argument("--tolerance", type=float, default=1.04, help="bisect until high / low <= this")
    parser.add_argument("--jobs", type=int, default=2, help="probes run at once")
    parser.add_argument(
        "--max-rate",
        type=float,
        default=8.0,
        help="highest rate_scale probed; a policy meeting the target there is capped",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "multirun" / "policy_benchmark-capacity" / "probes_v2.csv",
        help="finished probes, reused on the next run (delete it after changing the simulator or a policy)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "policy_benchmark")
    parser.add_argument(
        "--layouts",
        default="",
        help="mixed versus siloed (scenarios mvs_*): CLUSTER/INTERFERENCE items, e.g. silo_3llm_1tei/none,all_mixed_4/mps",
    )
    parser.add_argument("--name", default="", help="file stem of the report (default capacity, or capacity_mvs)")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    layouts = [x for x in args.layouts.split(",") if x]
    known = MVS_SCENARIOS if layouts else SCENARIOS
    unknown = sorted(set(scenarios) - set(known))
    if unknown:
        with_layouts = "with --layouts" if layouts else "without --layouts"
        parser.error(f"unknown scenario(s) {unknown} {with_layouts}; choose from {', '.join(known)}")
    if any("/" not in x for x in layouts):
        parser.error("--layouts items are CLUSTER/INTERFERENCE, e.g. all_mixed_4/mps (siloed layouts: /none)")
    if not 0.0 < args.target <= 1.0:
        parser.error("--target is an attainment fraction in (0, 1]")
    if not args.tolerance > 1.0:
        parser.error("--tolerance must be above 1 (the bracket's high / low ratio)")
    policies = [p for p in args.policies.split(",") if p]
    if layouts:
        policies = [f"{p}@{x}" for p in policies for x in layouts]
    name = args.name or ("capacity_mvs" if layouts else "capacity")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.max_rate > 0.0:
        parser.error("--max-rate must be above 0")
    cache = ProbeCache(args.cache)
    jobs = [(s, p, d, c) for c in CRITERIA for s in scenarios for p in policies for d in seeds]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda job: _search(cache, *job, args.target, args.tolerance, args.max_rate), jobs))
    found = pd.DataFrame([{k: v for k, v in r.items() if k != "probes"} for r in results])
    probes = pd.DataFrame([asdict(p) for r in results for p in r["probes"]])
    command = " ".join(["python experiments/policy_benchmark/capacity.py", *(sys.argv[1:] if argv is None else argv)])
    write_report(found, probes, args.out, args.target, command, name)
    print(f"wrote {args.out / (name + '.md')} and {name}.csv ({len(probes)} probes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
