"""Calibrate the llama.cpp engine model of a running llama-server from black-box probes only.

    sagesched calibrate llamacpp http://127.0.0.1:8001 --model gemma-3-270m --parallel 4 --ctx 8192 \\
        --out cpu.yaml [--embedding-url http://127.0.0.1:8002 --embedding-out cpu-embed.yaml]

Each probe is a small scenario whose llama.cpp batches we know exactly, because `id_slot` pins every
request to a slot and nothing else runs:
- idle: a one-token prompt, one output token, alone: TTFT = frontend + one micro-batch of one row;
- prefill sweep: lone prompts of increasing length, one output token: TTFT over 1..2 micro-batches;
- decode sweeps: c streams on chosen slots (consecutive and not, so llama.cpp's split into micro-batches
  varies), short and long contexts: the steady interval between tokens while all c decode = one step;
- mixed steps: streams decoding when a prompt arrives on another slot (below or above theirs): the
  interval that carries the newcomer's first token = one step of decodes + a whole prompt.
Every measured time is a sum of micro-batch times, and each micro-batch's time is linear in the step
model's coefficients (`llamacpp_perf.FEATURES`), so the design matrix is built by the engine model
itself (`LlamaCppEngineCore.plan_step` and `.ubatches` on the probe's slot state) and the coefficients
are fitted by non-negative least squares on relative errors (`scipy.optimize.nnls`), with leave-one-
probe-out and leave-one-kind-out cross-validation. The embedding server (one slot) gets the same
treatment with single- and multi-input requests.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import nnls

from sagesched.calibrate.llamacpp_client import Timed, embed, new_client, stream_completion, token_ids
from sagesched.sim.engines.llamacpp import LlamaCppConfig, LlamaCppEngineCore, SlotRequest
from sagesched.sim.engines.llamacpp_perf import FEATURES, CpuStepModel, LlamaCppCalibration
from sagesched.sim.engines.llamacpp_perf import step_features as step_feature_vector
from sagesched.sim.engines.types import EngineRequest

#: Columns of the fit: the step model's coefficients, then the frontend's per-request cost.
COLUMNS = (*FEATURES, "frontend_request_s")
#: Embedding server columns (no output rows: the pooled vector is not a logits row).
EMBEDDING_COLUMNS = (*(f for f in FEATURES if f != "output_s"), "frontend_request_s")


@dataclass(frozen=True)
class StepSpec:
    """A probe's server state: decoding slots (slot, KV length) and new prompts (slot, tokens).

    What it costs is simulated by the engine model: the steps from this state until every prompt has
    its first token (one step when there is no prompt).
    """

    decodes: tuple[tuple[int, int], ...] = ()
    prompts: tuple[tuple[int, int], ...] = ()


@dataclass
class Probe:
    """One probe point: what was measured (`seconds`, the median of `samples`) and the steps it spans."""

    kind: str
    label: str
    steps: list[StepSpec]
    frontend: bool
    samples: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(statistics.median(self.samples))


def step_features(cfg: LlamaCppConfig, spec: StepSpec) -> np.ndarray:
    """Summed micro-batch features of the steps from state `spec` until its prompts' first tokens,
    batched, chunked and split exactly as the engine model does for the same server settings."""
    core = LlamaCppEngineCore(cfg, perf=None)
    for slot_id, kv in spec.decodes:
        r = SlotRequest(EngineRequest(id=f"d{slot_id}", prompt_tokens=max(1, kv - 1), output_tokens=10**6), 10**6)
        r.n_past = kv
        r.generated = 1
        core.slots[slot_id].req = r
    waiting = set()
    for slot_id, tokens in spec.prompts:
        core.slots[slot_id].req = SlotRequest(EngineRequest(id=f"p{slot_id}", prompt_tokens=tokens), 1)
        waiting.add(f"p{slot_id}")
    total = np.zeros(len(FEATURES))
    for _ in range(10_000):
        batch = core.plan_step()
        if batch is None:
            raise ValueError(f"probe state {spec} has nothing to run")
        total += np.array(step_feature_vector(core.ubatches(batch)))
        out = core.finish_step(batch)
        waiting -= set(out.first_token_ids)
        if not waiting:
            return total
    raise RuntimeError(f"probe state {spec} did not produce its first tokens")


def design(probes: Sequence[Probe], cfg: LlamaCppConfig, columns: Sequence[str] = COLUMNS) -> np.ndarray:
    """One row per probe: the summed step features (restricted to `columns`) plus the frontend indicator."""
    rows = []
    for p in probes:
        f = sum((step_features(cfg, s) for s in p.steps), np.zeros(len(FEATURES)))
        full = dict(zip(FEATURES, f, strict=True))
        full["frontend_request_s"] = 1.0 if p.frontend else 0.0
        rows.append([full[c] for c in columns])
    return np.array(rows, dtype=float)


def _nnls_rel(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    w = 1.0 / y
    coef, _ = nnls(a * w[:, None], y * w)
    return coef


def fit(probes: Sequence[Probe], cfg: LlamaCppConfig, columns: Sequence[str] = COLUMNS) -> dict:
    """NNLS on relative errors; residuals, leave-one-probe-out and leave-one-kind-out errors."""
    a = design(probes, cfg, columns)
    y = np.array([p.seconds for p in probes])
    coef = _nnls_rel(a, y)
    pred = a @ coef
    loo = []
    for i in range(len(probes)):
        keep = np.arange(len(probes)) != i
        loo.append(float(a[i] @ _nnls_rel(a[keep], y[keep]) / y[i] - 1.0))
    by_kind: dict[str, float] = {}
    for kind in sorted({p.kind for p in probes}):
        held = np.array([p.kind == kind for p in probes])
        if held.all():
            continue
        c = _nnls_rel(a[~held], y[~held])
        by_kind[kind] = float(np.mean(np.abs(a[held] @ c / y[held] - 1.0)))
    return {
        "coefficients": {n: float(v) for n, v in zip(columns, coef, strict=True)},
        "points": [
            {
                "kind": p.kind,
                "label": p.label,
                "measured_s": round(p.seconds, 6),
                "predicted_s": round(float(q), 6),
                "residual": round(float(q / p.seconds - 1.0), 4),
                "leave_one_out": round(e, 4),
                "samples_s": [round(s, 6) for s in p.samples],
            }
            for p, q, e in zip(probes, pred, loo, strict=True)
        ],
        "mean_abs_residual": round(float(np.mean(np.abs(pred / y - 1.0))), 4),
        "mean_abs_leave_one_out": round(float(np.mean(np.abs(loo))), 4),
        "mean_abs_leave_one_kind_out": {k: round(v, 4) for k, v in by_kind.items()},
    }


# -- running the probes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbePlan:
    """What to probe. Defaults take about two minutes against Gemma 3 270M on one CPU thread."""

    # Lengths whose first step (all but the last 4 tokens) leaves 0, 1, 2, 3 rows past the blocks of 4.
    prefill_lengths: tuple[int, ...] = (8, 33, 98, 161, 255, 640)
    decode_slot_sets: tuple[tuple[int, ...], ...] = ((0,), (0, 1), (0, 1, 2), (0, 1, 2, 3), (0, 2), (1, 2, 3))
    decode_contexts: tuple[int, ...] = (16, 320)
    decode_tokens: int = 14
    mixed: tuple[tuple[tuple[int, ...], int, int], ...] = (
        ((0,), 1, 96),
        ((0, 1, 2), 3, 48),
        ((0, 1, 2), 3, 256),
        ((1, 2, 3), 0, 160),
        ((0, 1), 3, 128),
    )
    repeats: int = 3
    seed: int = 0


class _Prober:
    def __init__(self, url: str, model: str, seed: int, steps_per_prompt: int = 1) -> None:
        self.url, self.model = url, model
        self.rng = random.Random(seed)
        self.steps_per_prompt = steps_per_prompt

    async def lone(self, client, prompt: int, slot: int) -> float:
        t = await stream_completion(client, self.url, self.model, token_ids(self.rng, prompt), 1, slot=slot)
        if t.ttft_s is None:
            raise RuntimeError(f"no token streamed for a {prompt}-token probe")
        return t.ttft_s

    async def decode(self, client, slots: tuple[int, ...], prompt: int, tokens: int) -> float:
        runs = await asyncio.gather(
            *(
                stream_completion(client, self.url, self.model, token_ids(self.rng, prompt), tokens, slot=s)
                for s in slots
            )
        )
        lo = max(r.token_times[0] for r in runs)
        hi = min(r.token_times[-1] for r in runs)
        gaps = [
            b - a
            for r in runs
            for a, b in zip(r.token_times, r.token_times[1:], strict=False)
            if a >= lo - 1e-3 and b <= hi + 1e-3
        ]
        if not gaps:
            raise RuntimeError(f"decode probe on slots {slots}: the streams never decoded together")
        return float(statistics.median(gaps))

    async def mixed(self, client, slots: tuple[int, ...], slot: int, prompt: int) -> float:
        timed = [Timed(sent=0.0) for _ in slots]
        streams = [
            asyncio.create_task(
                stream_completion(client, self.url, self.model, token_ids(self.rng, 16), 40, slot=s, into=t)
            )
            for s, t in zip(slots, timed, strict=True)
        ]
        newcomer: Timed | None = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(s.done() for s in streams):
            await asyncio.sleep(0.02)
            if all(len(t.token_times) >= 3 for t in timed):  # every stream is decoding
                newcomer = await stream_completion(
                    client, self.url, self.model, token_ids(self.rng, prompt), 1, slot=slot
                )
                break
        runs = await asyncio.gather(*streams)
        if newcomer is None or not newcomer.token_times:
            raise RuntimeError(f"mixed probe {slots}+{slot}: could not send the prompt while the streams decoded")
        # The prompt joins the step after its arrival and (Gemma 3) ends in two steps: its body with the
        # decodes, then its last tokens with the decodes, which emits its first token. So the two decode
        # intervals ending with the decode token nearest that first token span exactly those steps.
        first = newcomer.token_times[0]
        gaps = []
        for r in runs:
            j = int(np.argmin([abs(x - first) for x in r.token_times]))
            if j >= self.steps_per_prompt:
                gaps.append(r.token_times[j] - r.token_times[j - self.steps_per_prompt])
        if not gaps:
            raise RuntimeError(f"mixed probe {slots}+{slot}: no decode interval around the prompt's step")
        return float(statistics.median(gaps))


async def run_llm_probes(url: str, model: str, cfg: LlamaCppConfig, plan: ProbePlan = ProbePlan()) -> list[Probe]:
    """Run the idle, prefill, decode and mixed probes against a llama-server with settings `cfg`."""
    if max((max(s) for s in plan.decode_slot_sets), default=0) >= cfg.n_parallel:
        raise ValueError(f"the probe plan uses slots beyond the server's {cfg.n_parallel} (-np)")
    pr = _Prober(url, model, plan.seed, steps_per_prompt=2 if cfg.checkpoint_tail_tokens else 1)
    probes: list[Probe] = []
    async with new_client() as client:
        for _ in range(2):  # warm-up: first-request paths, page cache, graph allocation
            await pr.lone(client, 8, 0)
        idle = Probe("idle", "1-token prompt", [StepSpec(prompts=((0, 1),))], True)
        for _ in range(plan.repeats):
            idle.samples.append(await pr.lone(client, 1, 0))
        probes.append(idle)
        for p_len in plan.prefill_lengths:
            pt = Probe("prefill", f"prompt {p_len}", [StepSpec(prompts=((0, p_len),))], True)
            for _ in range(plan.repeats):
                pt.samples.append(await pr.lone(client, p_len, 0))
            probes.append(pt)
        for ctx in plan.decode_contexts:
            for slots in plan.decode_slot_sets:
                if ctx > plan.decode_contexts[0] and len(slots) not in (1, cfg.n_parallel):
                    continue  # long contexts: one stream and all slots are enough to see the KV term
                kv = ctx + plan.decode_tokens // 2
                pt = Probe(
                    "decode", f"slots {list(slots)} ctx {ctx}", [StepSpec(decodes=tuple((s, kv) for s in slots))], False
                )
                for _ in range(max(2, plan.repeats - 1)):
                    pt.samples.append(await pr.decode(client, slots, ctx, plan.decode_tokens))
                probes.append(pt)
        for slots, slot, p_len in plan.mixed:
            kv = 16 + 5
            spec = StepSpec(decodes=tuple((s, kv) for s in slots), prompts=((slot, p_len),))
            pt = Probe("mixed", f"decoding {list(slots)} + prompt {p_len} on slot {slot}", [spec], False)
            for _ in range(max(2, plan.repeats - 1)):
                pt.samples.append(await pr.mixed(client, slots, slot, p_len))
            probes.append(pt)
    return probes


async def run_embedding_probes(
    url: str,
    model: str,
    lengths: tuple[int, ...] = (8, 33, 66, 131, 256, 387),
    multi: tuple[tuple[int, int], ...] = ((4, 32), (3, 128)),
    repeats: int = 3,
    seed: int = 1,
) -> list[Probe]:
    """Probe a one-slot embedding llama-server: single inputs over lengths, and k inputs of T tokens."""
    rng = random.Random(seed)
    probes: list[Probe] = []
    async with new_client() as client:
        for _ in range(2):
            await embed(client, url, model, [token_ids(rng, 8)])
        for n in lengths:
            pt = Probe("embed", f"1 x {n}", [StepSpec(prompts=((0, n),))], True)
            for _ in range(repeats):
                pt.samples.append((await embed(client, url, model, [token_ids(rng, n)])).e2e_s or 0.0)
            probes.append(pt)
        for k, n in multi:
            # One slot: llama-server runs the inputs of one call one after another, a step each.
            pt = Probe("embed_multi", f"{k} x {n}", [StepSpec(prompts=((0, n),))] * k, True)
            for _ in range(repeats):
                pt.samples.append((await embed(client, url, model, [token_ids(rng, n) for _ in range(k)])).e2e_s or 0.0)
            probes.append(pt)
    return probes


def calibration_from_fit(
    result: dict, *, model: str, hardware: str, server: dict, source: str, columns: Sequence[str] = COLUMNS
) -> LlamaCppCalibration:
    c = result["coefficients"]
    step = CpuStepModel(**{k: c.get(k, 0.0) for k in FEATURES})
    fit_doc = {k: v for k, v in result.items() if k != "coefficients"}
    fit_doc["method"] = (
        "scipy.optimize.nnls on relative errors over the probe points (columns: " + ", ".join(columns) + ")"
    )
    return LlamaCppCalibration(
        step=step,
        frontend_request_s=c.get("frontend_request_s", 0.0),
        model=model,
        hardware=hardware,
        server=server,
        fit=fit_doc,
        source=source,
    )


def probe_and_fit(
    url: str,
    model: str,
    cfg: LlamaCppConfig,
    *,
    embeddings: bool,
    repeats: int,
    hardware: str,
    server: dict,
    source: str,
) -> tuple[list[Probe], dict, LlamaCppCalibration]:
    """Probe a running llama-server, fit its step model, build its calibration: (probes, fit, calibration).

    The sequence both front ends run (`sagesched calibrate llamacpp` on a server the user runs,
    `calibrate.live_report` on one it starts): one definition, so that a file the CLI writes is
    the calibration the report checks. `cfg` and `server` must be the server's real settings.
    """
    columns: tuple[str, ...]
    if embeddings:
        probes = asyncio.run(run_embedding_probes(url, model, repeats=repeats))
        columns = EMBEDDING_COLUMNS
    else:
        probes = asyncio.run(run_llm_probes(url, model, cfg, ProbePlan(repeats=repeats)))
        columns = COLUMNS
    result = fit(probes, cfg, columns)
    cal = calibration_from_fit(result, model=model, hardware=hardware, server=server, source=source, columns=columns)
    return probes, result, cal


def machine_name() -> str:
    """A short name of this CPU for calibration files (model name and the CPUs this process may use)."""
    name = "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def probes_to_json(probes: Sequence[Probe]) -> list[dict]:
    return [
        {**{k: v for k, v in asdict(p).items() if k != "steps"}, "steps": [asdict(s) for s in p.steps]} for p in probes
    ]


def probes_from_json(rows: list[dict]) -> list[Probe]:
    """The inverse of `probes_to_json`."""
    return [
        Probe(
            r["kind"],
            r["label"],
            [StepSpec(tuple(map(tuple, s["decodes"])), tuple(map(tuple, s["prompts"]))) for s in r["steps"]],
            bool(r["frontend"]),
            [float(x) for x in r["samples"]],
        )
        for r in rows
    ]


def load_calibration_doc(path: str | Path) -> LlamaCppCalibration:
    """A calibration file's provenance fields, tolerating coefficient names of an older step model."""
    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return LlamaCppCalibration(
        step=CpuStepModel(),
        model=str(doc.get("model", "")),
        hardware=str(doc.get("hardware", "")),
        server=doc.get("server"),
        source=str(doc.get("source", "")).split("; refitted")[0],
    )
