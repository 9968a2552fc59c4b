"""The interactive TTFT floor *under the batch a run carried*: why halving FIFO's tail is out of reach
in some cells although the isolated-service floor (`analyze.py`'s ``inter_floor_vs_fifo``) allows it.

The isolated floor serves each interactive request alone on an idle GPU. Past saturation no GPU is
idle: vLLM's chunked prefill runs a prompt's chunks in steps that also carry every running
sequence's decode, and those steps get longer with the number of sequences (the A100 profile: a
3,072-token prompt takes 219 ms alone, 269 ms beside 40 decodes, 294 ms beside 60). This script
prices each interactive request of a run as the *only* prompt prefilling, on the LLM-capable GPU
with the fewest sequences running at its arrival (the run's 1 s timeline), beside that many decodes
of the run's mean context (prompt + half the output, over its LLM requests), and reports the p99 of
that against FIFO's measured p99 in the same cell and seed. The *collision floor* adds what the
interactive prompts cost each other: in arrival order, each goes to the LLM-capable GPU where it
would get its first token soonest, behind the interactive prompts already placed there, priced
beside the sequences the run had decoding on that GPU at its start and stretched by the shared-GPU
interference (``mps``: 1.5x) on a GPU whose embedding engine had work in flight then; every other
prefill is left out. Both are diagnostics, not bounds over all policies: a policy could keep fewer sequences running, at the cost of serving less (the capping
prototypes in the report's "Where hybrid loses" lost goodput).

    python experiments/policy_benchmark/loaded_floor.py multirun/policy_benchmark rag:2.2 embedding_heavy:3.0

writes a Markdown table to stdout (the report quotes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sagesched.sim.perf_model import BatchShape, LLMPerfModel


def prefill_alone_ms(model: LLMPerfModel, prompt: int, decodes: int, context: float, budget: int = 2048) -> float:
    """A prompt's TTFT as the only prefill, chunked into steps of `budget` tokens less one token
    per decoding sequence, each step beside `decodes` sequences of `context` tokens."""
    t, done = 0.0, 0
    chunk_room = max(1, budget - decodes)
    while done < prompt:
        c = min(prompt - done, chunk_room)
        ctx = done + c
        t += model.step_time_s(
            BatchShape(
                prefill_tokens=c,
                decode_tokens=decodes,
                prefill_context_tokens=ctx,
                decode_context_tokens=int(decodes * context),
                num_prefills=1,
                prefill_attention_pairs=c * (ctx - c / 2),
            )
        )
        done += c
    return t * 1000.0


def loaded_floor(run_dir: Path, model: LLMPerfModel) -> tuple[float, float, float]:
    """(loaded floor p99, isolated p99 by the same pricing, measured p99) of the interactive TTFT."""
    r = pd.read_parquet(run_dir / "requests.parquet")
    timeline = pd.read_parquet(run_dir / "timeline.parquet")
    llm = r[r["type"] != "embedding"]
    context = float((llm["prompt_tokens"] + llm["output_tokens"] / 2).mean())
    ids = set(llm["instance_id"].dropna())
    fewest = timeline[timeline["instance_id"].isin(ids)].groupby("time_s")["running"].min()
    inter = r[(r["workload_class"] == "interactive") & r["ttft_ms"].notna()]
    loaded, alone = [], []
    for row in inter.itertuples():
        running = int(fewest.asof(row.arrival_s)) if row.arrival_s >= fewest.index[0] else 0
        loaded.append(prefill_alone_ms(model, int(row.prompt_tokens), running, context))
        alone.append(prefill_alone_ms(model, int(row.prompt_tokens), 0, context))
    return (
        float(np.quantile(loaded, 0.99)),
        float(np.quantile(alone, 0.99)),
        float(inter["ttft_ms"].quantile(0.99)),
    )


def collision_floor(run_dir: Path, model: LLMPerfModel, stretch: float = 1.5) -> float:
    """The interactive TTFT p99 with only the interactive prompts prefilling, placed greedily (see
    the module docstring); embedding requests of the class keep their measured TTFT."""
    r = pd.read_parquet(run_dir / "requests.parquet")
    llm = r[r["type"] != "embedding"]
    emb = r[r["type"] == "embedding"]
    context = float((llm["prompt_tokens"] + llm["output_tokens"] / 2).mean())
    gpus = sorted(set(llm["instance_id"].dropna()))
    shared = set(emb["instance_id"].dropna()) & set(gpus)
    by_gpu = {g: llm[llm["instance_id"] == g] for g in gpus}
    emb_by_gpu = {g: emb[emb["instance_id"] == g] for g in shared}
    free = dict.fromkeys(gpus, 0.0)
    ttfts = []
    inter = r[(r["workload_class"] == "interactive") & r["ttft_ms"].notna()].sort_values("arrival_s")
    for row in inter.itertuples():
        if row.type == "embedding":
            ttfts.append(float(row.ttft_ms))
            continue
        t = float(row.arrival_s)
        best: tuple[float, str] | None = None
        for g in gpus:
            start = max(t, free[g])
            on = by_gpu[g]
            running = int(((on["first_token_s"] <= start) & (on["finish_s"] > start)).sum())
            duration = prefill_alone_ms(model, int(row.prompt_tokens), running, context) / 1000.0
            if g in shared:
                e = emb_by_gpu[g]
                if ((e["dispatch_s"] <= start) & (e["finish_s"] > start)).any():
                    duration *= stretch
            if best is None or start + duration < best[0]:
                best = (start + duration, g)
        assert best is not None
        free[best[1]] = best[0]
        ttfts.append((best[0] - t) * 1000.0)
    return float(np.quantile(ttfts, 0.99))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the benchmark's run folder (multirun/policy_benchmark)")
    parser.add_argument("cells", nargs="+", help="scenario:load, e.g. rag:2.2")
    parser.add_argument("--policy", default="hybrid")
    args = parser.parse_args(argv)
    model = LLMPerfModel.load("llama-2-7b", "a100")
    print(
        "| cell | seed | FIFO p99 (ms) | policy p99 | isolated floor | loaded floor | loaded floor / FIFO "
        "| collision floor | collision floor / FIFO |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in args.cells:
        scenario, load = cell.split(":")
        for seed in (1, 2):
            run = args.root / scenario / f"{args.policy}_x{float(load)}_s{seed}"
            fifo = args.root / scenario / f"fifo_x{float(load)}_s{seed}"
            if not run.exists() or not fifo.exists():
                print(f"missing {run} or {fifo}", file=sys.stderr)
                return 2
            floor, alone, measured = loaded_floor(run, model)
            collision = collision_floor(run, model)
            f = pd.read_parquet(fifo / "requests.parquet")
            fifo_p99 = float(f[(f["workload_class"] == "interactive") & f["ttft_ms"].notna()]["ttft_ms"].quantile(0.99))
            print(
                f"| {scenario} {load}x | {seed} | {fifo_p99:.0f} | {measured:.0f} | {alone:.0f} | {floor:.0f} "
                f"| {floor / fifo_p99:.2f} | {collision:.0f} | {collision / fifo_p99:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
