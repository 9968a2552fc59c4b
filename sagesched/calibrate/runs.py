"""Measured serving runs: what was asked of the server, what it measured, and the requests to replay.

Why a small typed layer: the fitter and the fidelity report must replay exactly the workload the
real server saw (same prompts, same arrival times, same server settings) and compare the same
statistics. Today one format is read: `inference-perf` run folders (`exp-config.yaml` with the vLLM
settings, `results/config.yaml` with what inference-perf really ran, `results/stage_N_lifecycle_metrics.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sagesched.core import Request, RequestType

#: The statistics compared per stage (seconds): means and p90s of end-to-end latency and TTFT, and the mean
#: decode interval per generated token (see `MeasuredStage.itl_mean`).
STATS: tuple[str, ...] = ("e2e_mean", "e2e_p90", "ttft_mean", "ttft_p90", "itl_mean")


class RunFormatError(ValueError):
    """A run folder is missing a file or a field the reader needs; the message names both."""


@dataclass(frozen=True)
class ServerSettings:
    """The vLLM settings of the measured server (what `exp-config.yaml` records)."""

    model: str
    tensor_parallel: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int


@dataclass(frozen=True)
class MeasuredStage:
    """One load stage: requested rate, duration, and the client-side statistics (seconds).

    `itl_mean` is the mean time between generated tokens derived from the means,
    (mean E2E - mean TTFT) / (output_len - 1): every request generates exactly `output_len` tokens
    (ignore_eos), so this is exact, whereas inference-perf's own ITL/TPOT are computed over re-tokenised
    stream chunks (their median is 0) and do not measure the engine's token interval.
    """

    index: int
    rate: float
    duration_s: float
    count: int
    failures: int
    stats: dict[str, float]
    prompt_len_mean: float


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """inference-perf's `shared_prefix` data as the run used it: `groups` x `per_group` fixed prompts,
    cycled in order; each is a group-shared system prompt plus its own question; `output_len` tokens each."""

    groups: int
    per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int


@dataclass(frozen=True)
class MeasuredRun:
    """A measured run: its name, server settings, workload and stages."""

    name: str
    path: Path
    server: ServerSettings
    workload: SharedPrefixWorkload
    stages: tuple[MeasuredStage, ...]
    hardware: str = "h100"
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def saturated(self) -> bool:
        """More than 5% of the requests failed: the server was past saturation (not for mean fitting)."""
        return any(s.failures > 0.05 * (s.count + s.failures) for s in self.stages)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RunFormatError(f"{path} is missing: an inference-perf run folder needs it")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RunFormatError(f"{path}: expected a mapping")
    return data


def _need(data: dict, key: str, where: Path):
    if key not in data or data[key] is None:
        raise RunFormatError(f"{where}: missing field {key!r}")
    return data[key]


def load_inference_perf(folder: str | Path, hardware: str = "h100") -> MeasuredRun:
    """Read one inference-perf run folder (see ../shared/calibration/README.md for the layout)."""
    root = Path(folder)
    if not root.is_dir():
        raise RunFormatError(f"{root} is not a directory (pass an inference-perf run folder)")
    exp = _read_yaml(root / "exp-config.yaml")
    ran = _read_yaml(root / "results" / "config.yaml")
    server = ServerSettings(
        model=str(_need(exp, "model", root / "exp-config.yaml")),
        tensor_parallel=int(exp.get("tensor_parallelism", 1)),
        max_model_len=int(_need(exp, "max_model_len", root / "exp-config.yaml")),
        max_num_batched_tokens=int(_need(exp, "max_num_batched_tokens", root / "exp-config.yaml")),
        max_num_seqs=int(_need(exp, "max_num_seqs", root / "exp-config.yaml")),
    )
    data = _need(ran, "data", root / "results" / "config.yaml")
    if data.get("type") != "shared_prefix":
        raise RunFormatError(f"{root}: data type {data.get('type')!r} is not supported (only shared_prefix)")
    sp = data["shared_prefix"]
    workload = SharedPrefixWorkload(
        groups=int(sp["num_groups"]),
        per_group=int(sp["num_prompts_per_group"]),
        system_prompt_len=int(sp["system_prompt_len"]),
        question_len=int(sp["question_len"]),
        output_len=int(sp["output_len"]),
    )
    load = _need(ran, "load", root / "results" / "config.yaml")
    if load.get("type") != "constant":
        raise RunFormatError(f"{root}: load type {load.get('type')!r} is not supported (only constant)")
    stages = []
    for i, st in enumerate(load["stages"]):
        path = root / "results" / f"stage_{i}_lifecycle_metrics.json"
        if not path.is_file():
            raise RunFormatError(f"{path} is missing (the run has {len(load['stages'])} stages)")
        m = json.loads(path.read_text())
        lat = m["successes"]["latency"]
        e2e, ttft = lat["request_latency"], lat["time_to_first_token"]
        out = workload.output_len
        stats = {
            "e2e_mean": e2e["mean"],
            "e2e_p90": e2e["p90"],
            "ttft_mean": ttft["mean"],
            "ttft_p90": ttft["p90"],
            "itl_mean": (e2e["mean"] - ttft["mean"]) / max(1, out - 1),
        }
        stages.append(
            MeasuredStage(
                index=i,
                rate=float(st["rate"]),
                duration_s=float(st["duration"]),
                count=int(m["successes"]["count"]),
                failures=int((m.get("failures") or {}).get("count") or 0),
                stats=stats,
                prompt_len_mean=float(m["successes"]["prompt_len"]["mean"]),
            )
        )
    name = root.name.split("-tp1-")[-1] if "-tp1-" in root.name else root.name
    return MeasuredRun(name=name, path=root, server=server, workload=workload, stages=tuple(stages), hardware=hardware)


def find_runs(folder: str | Path) -> list[MeasuredRun]:
    """Every inference-perf run folder directly under `folder` (or `folder` itself), sorted by name."""
    root = Path(folder)
    if (root / "exp-config.yaml").is_file():
        return [load_inference_perf(root)]
    runs = [load_inference_perf(p) for p in sorted(root.iterdir()) if (p / "exp-config.yaml").is_file()]
    if not runs:
        raise RunFormatError(f"no inference-perf run folder (with exp-config.yaml) under {root}")
    return runs


def build_requests(
    run: MeasuredRun, model: str, window_s: float | None = None, block_tokens: int = 16
) -> tuple[list[Request], list[tuple[float, float]]]:
    """The run's requests as the server saw them, and each stage's [start, end) in arrival time.

    Prompt length per stage is the measured mean (inference-perf's own token count of the prompt);
    prompt i (cycled every groups x per_group requests) shares its group's system prompt, whose full
    blocks get group-wide hashes, and its remaining blocks get prompt-unique hashes (vLLM chains block
    hashes, so a block after the first differing token is unique). `window_s` replays only the first
    seconds of each stage (for fast fitting), the stages still back to back.
    """
    w = run.workload
    n_prompts = w.groups * w.per_group
    reqs: list[Request] = []
    spans: list[tuple[float, float]] = []
    t0 = 0.0
    k = 0
    for st in run.stages:
        dur = st.duration_s if window_s is None else min(window_s, st.duration_s)
        n = round(dur * st.rate)
        prompt = round(st.prompt_len_mean)
        sys_blocks = w.system_prompt_len // block_tokens
        nblocks = prompt // block_tokens
        for j in range(n):
            p = k % n_prompts
            g = p // w.per_group
            hashes = tuple(
                (g * 1_000 + b) if b < sys_blocks else (10**9 + (p * 10_000 + prompt) * 1_000 + b)
                for b in range(nblocks)
            )
            reqs.append(
                Request(
                    id=f"{run.name}-{k}",
                    type=RequestType.LLM_GENERATE,
                    model=model,
                    arrival_s=t0 + j / st.rate,
                    prompt_tokens=prompt,
                    max_tokens=w.output_len,
                    output_tokens=w.output_len,
                    prefix_hashes=hashes,
                )
            )
            k += 1
        spans.append((t0, t0 + dur))
        t0 += dur
    return reqs, spans
