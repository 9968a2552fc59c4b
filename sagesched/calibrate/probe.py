"""Black-box probes of a running OpenAI-compatible server, and the fit of step-time coefficients to them.

    sagesched calibrate probe http://127.0.0.1:8000 --model M --engine vllm --profile llama-2-7b \\
        --hardware a100 --out cal.yaml
    sagesched calibrate probe http://127.0.0.1:8080 --model M --engine llamacpp --out cpu.yaml

Why probes: a server we cannot instrument still answers timed requests. Prompts are sent as token-id
arrays (exact lengths without the server's tokenizer, and distinct ids per probe so that no prompt
cache helps), streamed with `ignore_eos`:
- prefill sweep: one request at a time, prompts of increasing length, 1 output token: TTFT(P);
- decode sweep: c concurrent streams of a short prompt for `decode_tokens` tokens: the mean interval
  between streamed tokens at batch c and known context.
The fit is non-negative least squares (`scipy.optimize.nnls`) on relative errors, with a
leave-one-point-out cross-validation:
- `--engine vllm`: the columns are the LLM perf model's own terms for each probe's batch (operators,
  attention, per-step, per-sequence, frontend), so the result is an `LLMCalibration` file
  (`linear_scale`, `attention_scale`, `step_overhead_s`, `seq_overhead_s`, `frontend_request_s`);
- `--engine llamacpp`: an `AffineStepModel` (per step, per prompt token, per decoding sequence, per
  attended (query, key) pair) plus the frontend's per-request cost. For llama-server prefer
  `sagesched calibrate llamacpp` (`llamacpp_probe`): it builds each probe's batches with the engine model
  (slots, micro-batches, checkpoint tail) and fits the CPU step model the simulator uses.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml
from scipy.optimize import nnls

from sagesched.calibrate.llamacpp_client import token_ids
from sagesched.sim.perf_model import BatchShape


class ProbeError(RuntimeError):
    """The server did not answer a probe as an OpenAI-compatible completions endpoint should."""


@dataclass(frozen=True)
class ProbePoint:
    """One probe: `kind` "prefill" (lone request, TTFT) or "decode" (concurrent streams, token interval)."""

    kind: str
    prompt_tokens: int
    concurrency: int
    output_tokens: int
    seconds: float


async def _stream(client: httpx.AsyncClient, url: str, model: str, ids: list[int], max_tokens: int) -> list[float]:
    """Send one streamed completion; return the arrival times of the chunks that carry text."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")[:200]
            raise ProbeError(f"{url}/v1/completions answered {resp.status_code}: {text}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text":""' not in line.replace(" ", ""):
                stamps.append(time.monotonic())
    return stamps


async def run_probes(
    url: str,
    model: str,
    prompt_lengths: tuple[int, ...] = (16, 128, 512, 1024),
    concurrencies: tuple[int, ...] = (1, 2, 4, 8),
    decode_prompt: int = 64,
    decode_tokens: int = 32,
    repeats: int = 2,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> list[ProbePoint]:
    """Run the prefill and decode sweeps against `url`; the median of `repeats` per point."""
    rng = random.Random(seed)

    points: list[ProbePoint] = []
    # A fresh connection per request: llama-server closes a connection after a stream ends, and a
    # pooled connection reused after that fails with "server disconnected".
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await _stream(
            client, url, model, token_ids(rng, 8), 1
        )  # warm the connection and the server's first-request paths
        for p in prompt_lengths:
            runs = []
            for _ in range(repeats):
                start = time.monotonic()
                stamps = await _stream(client, url, model, token_ids(rng, p), 1)
                if not stamps:
                    raise ProbeError(f"no token streamed for a {p}-token prompt")
                runs.append(stamps[0] - start)
            points.append(ProbePoint("prefill", p, 1, 1, float(np.median(runs))))
        for c in concurrencies:
            runs = []
            for _ in range(repeats):
                streams = await asyncio.gather(
                    *(_stream(client, url, model, token_ids(rng, decode_prompt), decode_tokens) for _ in range(c))
                )
                gaps = [(s[-1] - s[0]) / (len(s) - 1) for s in streams if len(s) > 2]
                if not gaps:
                    raise ProbeError("streams carried fewer than 3 text chunks; is ignore_eos honoured?")
                runs.append(float(np.mean(gaps)))
            points.append(ProbePoint("decode", decode_prompt, c, decode_tokens, float(np.median(runs))))
    return points


def _prefill_shape(p: int) -> BatchShape:
    return BatchShape(
        prefill_tokens=p, prefill_context_tokens=p, num_prefills=1, prefill_attention_pairs=p * (p - p / 2)
    )


def _decode_shape(pt: ProbePoint) -> BatchShape:
    ctx = pt.prompt_tokens + pt.output_tokens / 2
    return BatchShape(decode_tokens=pt.concurrency, decode_context_tokens=int(pt.concurrency * ctx))


def design(points: list[ProbePoint], engine: str, perf=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The NNLS design matrix (one row per probe), a fixed part of each probe's time kept as the perf
    model has it (the LM head, for vllm), and the column names."""
    rows, fixed = [], []
    for pt in points:
        shape = _prefill_shape(pt.prompt_tokens) if pt.kind == "prefill" else _decode_shape(pt)
        lone = 1.0 if pt.kind == "prefill" else 0.0
        seqs = float(shape.decode_tokens + shape.num_prefills)
        if engine == "vllm":
            c = perf.components(shape)
            att = c["prefill_attention"] + c["decode_attention"]
            rows.append([c["operators"], att, 1.0, seqs, lone])
            fixed.append(c["lm_head"])
        else:
            pairs = float(shape.decode_context_tokens + shape.prefill_attention_pairs)
            rows.append([1.0, float(shape.prefill_tokens), float(shape.decode_tokens), pairs, lone])
            fixed.append(0.0)
    if engine == "vllm":
        names = ["linear_scale", "attention_scale", "step_overhead_s", "seq_overhead_s", "frontend_request_s"]
    else:
        names = ["step_s", "prefill_token_s", "decode_seq_s", "context_pair_s", "frontend_request_s"]
    return np.array(rows), np.array(fixed), names


def fit_probes(points: list[ProbePoint], engine: str, perf=None) -> dict:
    """NNLS on relative errors; coefficients, per-point residuals, leave-one-point-out errors."""
    a, fixed, names = design(points, engine, perf)
    y = np.array([pt.seconds for pt in points])
    w = 1.0 / y
    coef, _ = nnls(a * w[:, None], (y - fixed) * w)
    pred = a @ coef + fixed
    loo = []
    for i in range(len(points)):
        keep = np.arange(len(points)) != i
        c_i, _ = nnls(a[keep] * w[keep, None], (y[keep] - fixed[keep]) * w[keep])
        loo.append(float((a[i] @ c_i + fixed[i]) / y[i] - 1.0))
    return {
        "coefficients": {n: float(v) for n, v in zip(names, coef, strict=True)},
        "residuals": [float(v) for v in pred / y - 1.0],
        "leave_one_out": loo,
        "points": [asdict(p) for p in points],
    }


def cmd_probe(args: argparse.Namespace) -> int:
    perf = None
    if args.engine == "vllm":  # checked before the probes: a wrong --hardware must not cost a whole sweep
        from sagesched.sim.perf_model import LLMPerfModel

        try:
            perf = LLMPerfModel.load(args.profile, args.hardware, args.tensor_parallel)
        except ValueError as exc:
            print(f"sagesched calibrate probe: {exc}; fix --profile / --hardware / --tensor-parallel", file=sys.stderr)
            return 2
    try:
        points = asyncio.run(
            run_probes(
                args.url,
                args.model,
                prompt_lengths=tuple(args.prompts),
                concurrencies=tuple(args.concurrency),
                repeats=args.repeats,
            )
        )
    except httpx.HTTPError as exc:
        print(
            f"sagesched calibrate probe: {args.url}: {type(exc).__name__}: {exc}; check that the server runs there "
            f"and answers to --model {args.model}",
            file=sys.stderr,
        )
        return 1
    fit = fit_probes(points, args.engine, perf)
    doc: dict = {
        "source": f"sagesched calibrate probe {args.url}",
        "notes": f"engine {args.engine}, model {args.model}",
    }
    if args.engine == "vllm":
        doc.update(model=args.profile, hardware=args.hardware, tensor_parallel=args.tensor_parallel)
    # A scale fitted to 0 means the probes did not exercise that term (e.g. attention with short
    # prompts): leave it out (the profile's value stays) rather than write an invalid calibration.
    unidentified = [k for k, v in fit["coefficients"].items() if k.endswith("scale") and v <= 0.0]
    doc.update({k: float(f"{v:.6g}") for k, v in fit["coefficients"].items() if k not in unidentified})
    doc["fit"] = {
        "mean_abs_residual": round(float(np.mean(np.abs(fit["residuals"]))), 4),
        "mean_abs_leave_one_out": round(float(np.mean(np.abs(fit["leave_one_out"]))), 4),
        "unidentified": unidentified,
        "points": fit["points"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"coefficients: {fit['coefficients']}")
    print(f"mean |residual| {doc['fit']['mean_abs_residual']}, leave-one-out {doc['fit']['mean_abs_leave_one_out']}")
    print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="probe a running OpenAI-compatible server and fit step-time coefficients")
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000 (only servers you run)")
    p.add_argument("--model", required=True, help="the model name the server expects in requests")
    p.add_argument("--engine", choices=("vllm", "llamacpp"), default="vllm")
    p.add_argument("--profile", default="llama-2-7b", help="vllm: the model profile (or config.json) to calibrate")
    p.add_argument("--hardware", default="a100", help="vllm: the GPU profile to calibrate")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512, 1024], help="prefill sweep lengths")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="decode sweep stream counts")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_probe)
