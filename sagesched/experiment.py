"""The experiment entry point: `python -m sagesched.experiment policy=hybrid [overrides...]`.

Hydra composes the config tree in `conf/` (groups: policy, cluster, workload, model, sim), this
module builds the typed configs from it, runs the simulator (`driver=sim`, the default) or replays
the same workload live (`driver=live`: our executor and policy over the cluster's `url:`s;
`driver=endpoint`: one external server, see docs/replay.md), and writes into Hydra's run directory:
`requests.parquet` (one row per request), `timeline.parquet`, `summary.json` and plots. With `-m`
the same command runs a sweep through whichever Hydra launcher is selected (joblib locally, Ray or
SLURM on a cluster: see docs/experiments.md).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sagesched.experiment_parts import ExperimentError, build_policy, ended_reasons, json_default, workload_requests

log = logging.getLogger("sagesched.experiment")


def _pick(items: Sequence[Any], index: Any) -> Any:
    """`${pick:LIST,INDEX}`: the item at INDEX modulo the list's length (e.g. a trace window per seed)."""
    if not len(items):
        raise ExperimentError("${pick:...} got an empty list; give it at least one item")
    return items[int(index) % len(items)]


def register_resolvers() -> None:
    """OmegaConf resolvers the config tree may use; idempotent, run on import (also in sweep workers)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("pick"):
        OmegaConf.register_new_resolver("pick", _pick)


register_resolvers()


def conf_dir() -> Path:
    """The config tree: inside the package when installed as a wheel, at the repo root in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ExperimentError(f"sagesched's Hydra config tree (conf/config.yaml) is missing next to {here}; reinstall")


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _options(group: str) -> str:
    """The shipped options of config group `group` (conf/<group>/*.yaml), comma-separated."""
    return ", ".join(sorted(path.stem for path in (conf_dir() / group).glob("*.yaml"))) or "(none)"


def check_group_choices(overrides: Sequence[str], groups: Sequence[str]) -> None:
    """Refuse ``group=null`` for a config group (Hydra fails on it with a traceback)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and key in groups and value.strip().lower() == "null":
            raise ExperimentError(f"{override!r} selects no {key}; choose one with {key}=<option>: {_options(key)}")


def check_top_level(cfg: Any) -> None:
    """The top-level keys the experiment reads: each needed config group selected, `seed` a whole
    number, `fail_on_unserved` true or false (a string such as 'false' would read as true)."""
    for group in ("policy", "cluster", "workload"):
        if group not in cfg or cfg[group] is None:
            raise ExperimentError(
                f"no {group} is selected (`{group}=[]` or `~{group}` removes it); choose one with "
                f"{group}=<option>: {_options(group)}"
            )
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not (isinstance(seed, int) or (isinstance(seed, float) and seed.is_integer())):
        raise ExperimentError(f"seed must be a whole number (e.g. seed=1), got {seed!r}")
    fail = cfg.get("fail_on_unserved", False)
    if not isinstance(fail, bool):
        raise ExperimentError(f"fail_on_unserved must be true or false, got {fail!r}")


def run(cfg: Any, out_dir: str | Path, *, progress: bool | None = None) -> dict[str, Any]:
    """Run one experiment from a composed config; write outputs into `out_dir`; return the summary."""
    from sagesched.replay.config import DriverConfig

    check_top_level(cfg)
    resolved = _plain(cfg)
    resolved["seed"] = int(resolved.get("seed", 0))
    driver = DriverConfig.from_dict(resolved.get("driver") or {"name": "sim"})
    if driver.name == "live":
        from sagesched.replay.experiment import run_live

        return run_live(resolved, driver, Path(out_dir), progress=progress)
    return _run_sim(resolved, out_dir, progress=progress)


def _run_sim(resolved: dict[str, Any], out_dir: str | Path, *, progress: bool | None = None) -> dict[str, Any]:
    from sagesched.bounds import bound_summary
    from sagesched.replay.cluster import sim_cluster_dict
    from sagesched.sim import ClusterConfig, SimConfig, simulate

    seed = int(resolved.get("seed", 0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        policy = build_policy(resolved["policy"])
        cluster = ClusterConfig.from_dict(sim_cluster_dict(resolved["cluster"]))
        sim_dict = dict(resolved.get("sim") or {})
        if progress is not None:
            sim_dict["progress"] = progress
        sim_cfg = SimConfig.from_dict({**sim_dict, "seed": seed})
    except KeyError as exc:
        raise ExperimentError(f"config group {exc} is missing; check conf/config.yaml's defaults list") from None

    started = time.perf_counter()
    requests = workload_requests(resolved["workload"], seed)
    result = simulate(requests, cluster, policy, sim_cfg)

    summary = result.summary()
    offered_s = max(requests[-1].arrival_s - requests[0].arrival_s, 1e-9)
    summary.update(
        ended_reasons=ended_reasons(result.records),
        driver="sim",
        policy=policy.name,
        label=str(resolved.get("label") or policy.name),
        policy_config=policy.describe(),
        seed=seed,
        offered_rps=len(requests) / offered_s,
        sim_wall_s=result.wall_s,
        total_wall_s=time.perf_counter() - started,
        bound=bound_summary(requests, cluster),
        config=resolved,
    )
    result.records.to_parquet(out / "requests.parquet", index=False)
    if result.timeline is not None and len(result.timeline):
        result.timeline.to_parquet(out / "timeline.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    from sagesched.plots import plot_run

    plot_run(result.records, result.timeline, out)
    return summary


SUMMARY_TABLE = (
    ("requests", "requests", "{:d}"),
    ("completed", "completed", "{:d}"),
    ("rejected", "rejected", "{:d}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("tpot_p50_ms", "TPOT p50 (ms)", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 (ms)", "{:.1f}"),
    ("e2e_p99_ms", "end-to-end p99 (ms)", "{:.1f}"),
    ("embedding_p99_ms", "embedding p99 (ms)", "{:.1f}"),
    ("slo_attainment", "SLO attainment", "{:.3f}"),
    ("goodput_rps", "goodput (req/s)", "{:.2f}"),
    ("throughput_tokens_per_s", "throughput (tok/s)", "{:.0f}"),
    ("sim_wall_s", "simulation wall time (s)", "{:.2f}"),
)


def unserved_lines(summary: dict[str, Any]) -> list[str]:
    """Loud lines for requests that were not served: a run that rejected half its workload must
    not read like a success."""
    total = summary.get("requests") or 0
    lines = []
    for outcome in ("rejected", "failed"):
        n = summary.get(outcome) or 0
        if not n or not total:
            continue
        reasons = (summary.get("ended_reasons") or {}).get(outcome) or {}
        common = "; ".join(f"{count} x {reason}" for reason, count in reasons.items())
        lines.append(
            f"  WARNING: {n} of {total} requests ({100.0 * n / total:.1f}%) {outcome}"
            + (f", most often: {common}" if common else "")
            + " (requests.parquet, column reason; fail_on_unserved=true makes this exit 3)"
        )
    return lines


def check_overrides(overrides: Sequence[str], groups: Sequence[str]) -> None:
    """Refuse a command-line override that adds a top-level key nothing reads (`+bogus=1`).

    Hydra accepts any ``+key=value`` and the experiment would silently ignore it; a misspelt or
    misplaced setting (``+rate_scale=2`` for ``workload.rate_scale=2``) must not pass unnoticed.
    """
    known = {"seed", "label", "scenario", "fail_on_unserved", *groups}
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0].split("@", 1)[0]
        if "." in key or "/" in key or key in known or key.startswith("hydra"):
            continue
        raise ExperimentError(
            f"{override!r} adds a top-level key {key!r} that the experiment never reads; set a field of a "
            f"config group instead (e.g. workload.{key}=..., sim.{key}=..., policy.{key}=...). Top-level keys: "
            f"{', '.join(sorted(known))}"
        )


LIVE_TABLE = (
    ("send_lateness_p99_ms", "send lateness p99 (ms)", "{:.2f}"),
    ("prompt_token_mismatches", "prompt token mismatches", "{:d}"),
    ("output_token_mismatches", "output token mismatches", "{:d}"),
)


def format_summary(summary: dict[str, Any]) -> str:
    """A compact two-column table for the terminal."""
    label = summary.get("label")
    policy = str(summary.get("policy"))
    rows = [("policy", policy if not label or label == policy else f"{label} ({policy})")]
    for key, label, fmt in SUMMARY_TABLE:
        value = summary.get(key)
        rows.append((label, "–" if value is None else fmt.format(value)))
    if summary.get("driver") == "live":  # what only a live run measures (docs/replay.md)
        for key, label, fmt in LIVE_TABLE:
            value = summary.get(key)
            rows.append((label, "–" if value is None else fmt.format(value)))
    bound = summary.get("bound") or {}
    if bound.get("slo_attainment_upper") is not None:
        rows.append(("SLO attainment bound", f"{bound['slo_attainment_upper']:.3f}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join([*(f"  {label:<{width}}  {value}" for label, value in rows), *unserved_lines(summary)])


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
    def task(cfg) -> float | None:
        out_dir = HydraConfig.get().runtime.output_dir
        multirun = HydraConfig.get().mode is RunMode.MULTIRUN
        try:
            check_overrides(HydraConfig.get().overrides.task, list(HydraConfig.get().runtime.choices))
            summary = run(cfg, out_dir, progress=None if not multirun else False)
        except (ValueError, FileNotFoundError) as exc:
            if multirun:
                raise
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(format_summary(summary), file=sys.stderr if multirun else sys.stdout)
        print(f"outputs: {out_dir}", file=sys.stderr if multirun else sys.stdout)
        if cfg.get("fail_on_unserved") and (summary.get("rejected") or summary.get("failed")):
            raise SystemExit(3)
        return summary.get("goodput_rps")

    try:
        check_group_choices(sys.argv[1:], [path.name for path in conf_dir().iterdir() if path.is_dir()])
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    task()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point shared by `python -m sagesched.experiment` and `sagesched experiment`."""
    if argv is not None:
        sys.argv = ["sagesched experiment", *argv]
    _hydra_main()
    return 0


if __name__ == "__main__":
    main()
