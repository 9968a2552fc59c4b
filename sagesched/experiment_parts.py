"""What both experiment drivers build a run from and write a run's summary with.

`sagesched.experiment` (the entry point; `driver=sim`) and `sagesched.replay.experiment`
(`driver=live`) read the same composed config: the policy and the workload's requests are built
here once for both, and both summaries carry the same outcome reasons and JSON encoding. Kept apart
from the entry point so the live driver does not import the module that imports it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("sagesched.experiment")


class ExperimentError(ValueError):
    """A config or input problem; the message names the fix."""


def build_policy(policy_cfg: dict[str, Any]):
    """The policy the config's `policy` group names, built with its other fields (a bad field is
    reported with its path from the config's root: the override to fix)."""
    from sagesched.policies import make_policy

    cfg = dict(policy_cfg)
    name = cfg.pop("name", None)
    if not name:
        raise ExperimentError("the policy config has no `name`; choose one with policy=<name>")
    from sagesched.typed_config import ConfigFieldError

    try:
        return make_policy(str(name), **cfg)
    except ConfigFieldError as exc:  # located from the config's root: the override to fix
        raise ConfigFieldError(("policy", *exc.path), exc.message) from None


def workload_requests(workload_cfg: dict[str, Any], seed: int) -> list:
    """The workload's requests: a plain CSV trace (`trace: csv`, sagesched.replay.traces) or the builder's."""
    from sagesched.replay.traces import build_csv_workload
    from sagesched.sim.workloads import WorkloadConfig, build_workload

    workload_dict = dict(workload_cfg)
    workload_dict.pop("name", None)  # a report label, not a workload field
    if workload_dict.get("trace") == "csv":
        requests = build_csv_workload(workload_dict)
    else:
        requests = build_workload(WorkloadConfig.from_dict(workload_dict), seed)
    if not requests:
        raise ExperimentError("the workload produced no requests; widen workload.duration_s or raise rate_scale")
    log.info(
        "workload: %d requests over %.0f s (%s)", len(requests), requests[-1].arrival_s, workload_dict.get("trace")
    )
    return requests


def ended_reasons(records: Any, top: int = 3) -> dict[str, dict[str, int]]:
    """The most common reasons per unsuccessful outcome (rejected, failed), for the summary."""
    out: dict[str, dict[str, int]] = {}
    for outcome in ("rejected", "failed"):
        reasons = records.loc[records["outcome"] == outcome, "reason"]
        if len(reasons):
            out[outcome] = {str(k): int(v) for k, v in reasons.value_counts().head(top).items()}
    return out


def json_default(value: Any) -> Any:
    """`json.dumps` default for a summary: numpy scalars as numbers, sets and tuples as lists, else str."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)
