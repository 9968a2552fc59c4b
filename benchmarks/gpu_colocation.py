"""How much an LLM step and an embedding batch slow each other on one GPU, measured.

    python benchmarks/gpu_colocation.py --out coloc.json                   # on a CUDA machine (~2 min)
    python benchmarks/gpu_colocation.py --device cpu --tiny --out x.json   # the code path, on a CPU

Why: a shared GPU's interference in the simulator (`sagesched.sim.engines.shared_gpu`) is a
bracket of presets derived from a roofline (time slicing: each engine's work 2x as long while the
other is busy; `mps`: 1.5x; ideal: 1x), and the mixed-versus-siloed study's result scales with it.
This script measures it instead, with random-weight PyTorch models of the real architectures (no
weights to download): a Llama-2-7B decoder (one decode step of a batch over a KV cache, or one
prefill chunk) and a bge-base encoder (BERT-base: one TEI-sized batch of 32 x 512 tokens).

Three measurements, each over `--seconds` of back-to-back steps after a warm-up:
- ``alone``: each workload alone on the GPU;
- ``streams``: both in one process, each on its own CUDA stream and thread, so that their kernels
  can overlap (what MPS, or one process serving both, allows);
- ``processes``: each in its own process and CUDA context, as two servers run side by side
  without MPS (the driver time-slices the contexts).

Each engine's *stretch* is its median step time beside the other over its median alone. The output
also gives the `SharedGpuConfig` fields that make the engine model reproduce both stretches: the
model runs the LLM engine at share ``(1 + overlap) * w_llm / (w_llm + w_emb)`` of its speed while
both are busy (and the embedding engine likewise), so ``overlap = 1/s_llm + 1/s_emb - 1`` and
``w_llm / (w_llm + w_emb) = (1 / s_llm) / (1 + overlap)`` (`shared_gpu_config`).

Steps are CUDA graphs on a GPU (vLLM replays its decode steps as graphs too; `--no-graphs` for eager
mode) and synchronise after each step, as a serving engine does to read its outputs. The decode
step does not write its new keys into the cache (a few KiB per step; the reads dominate). Needs
only PyTorch and the standard library, so it runs on a bare GPU machine without this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import queue
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-style decoder (Llama-2-7B by default: its config.json's sizes)."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    ffn: int = 11008
    vocab: int = 32000


@dataclass(frozen=True)
class EncoderShape:
    """A BERT-style encoder (bge-base-en-v1.5 = BERT-base: its config.json's sizes)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072


TINY_DECODER = DecoderShape(hidden=256, layers=2, heads=4, ffn=512, vocab=1000)
TINY_ENCODER = EncoderShape(hidden=128, layers=2, heads=4, ffn=256)


def shared_gpu_config(s_llm: float, s_emb: float) -> dict[str, float]:
    """`SharedGpuConfig` fields under which the engine model stretches LLM work by `s_llm` and
    embedding work by `s_emb` while both engines are busy (weights normalised to sum to 1).

    Stretches below 1 are measurement noise (co-location never speeds a step up) and count as 1;
    the overlap is capped at 1 (no interference), where both shares reach full speed.
    """
    if s_llm <= 0 or s_emb <= 0:
        raise ValueError(f"stretches must be positive, got {s_llm!r} and {s_emb!r}")
    share_llm, share_emb = 1.0 / max(1.0, s_llm), 1.0 / max(1.0, s_emb)
    overlap = min(1.0, share_llm + share_emb - 1.0)
    if overlap < 0:
        # Both slower than time slicing would make them (e.g. context-switch costs): the model's
        # shares cannot sum below 1, so keep the measured ratio between them at overlap 0.
        overlap = 0.0
    weight = share_llm / (share_llm + share_emb)
    return {"llm_weight": round(weight, 6), "embedding_weight": round(1.0 - weight, 6), "overlap": round(overlap, 6)}


def summarise(times_s: list[float], trim: float = 0.1) -> float:
    """Median step time in seconds, leaving out the first and last `trim` of the steps (the
    partner may start or stop during them)."""
    if not times_s:
        raise ValueError("no steps were timed: raise --seconds")
    cut = int(len(times_s) * trim)
    kept = times_s[cut : len(times_s) - cut] or times_s
    return statistics.median(kept)


# --- the workloads (PyTorch from here on) --------------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise SystemExit("this benchmark needs PyTorch: pip install torch (any CUDA build for a GPU)") from exc
    return torch


def _weights(torch: Any, shape: tuple[int, ...], device: str, dtype: Any) -> Any:
    return (torch.randn(shape, device=device, dtype=torch.float32) * 0.02).to(dtype)


def decoder_step(
    shape: DecoderShape, work: str, batch: int, context: int, chunk: int, device: str, dtype: Any
) -> Callable[[], Any]:
    """A closure running one LLM step: a decode step of `batch` sequences over `context` cached
    tokens each (`work` "decode"), or a `chunk`-token prefill chunk of one sequence ("prefill")."""
    torch = _torch()
    f = torch.nn.functional
    h, nh = shape.hidden, shape.heads
    hd = h // nh
    layers = [
        {
            "qkv": _weights(torch, (3 * h, h), device, dtype),
            "o": _weights(torch, (h, h), device, dtype),
            "gate_up": _weights(torch, (2 * shape.ffn, h), device, dtype),
            "down": _weights(torch, (h, shape.ffn), device, dtype),
        }
        for _ in range(shape.layers)
    ]
    head = _weights(torch, (shape.vocab, h), device, dtype)
    if work == "decode":
        tokens, seqs = 1, batch
        caches = [
            (
                _weights(torch, (batch, nh, context, hd), device, dtype),
                _weights(torch, (batch, nh, context, hd), device, dtype),
            )
            for _ in range(shape.layers)
        ]
    elif work == "prefill":
        tokens, seqs, caches = chunk, 1, []
    else:
        raise ValueError(f"unknown LLM work {work!r}: use decode or prefill")
    x0 = _weights(torch, (seqs, tokens, h), device, dtype)

    def rms(x: Any) -> Any:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def step() -> Any:
        x = x0
        for i, w in enumerate(layers):
            q, k, v = (rms(x) @ w["qkv"].T).split(h, dim=-1)
            q, k, v = (t.view(seqs, tokens, nh, hd).transpose(1, 2) for t in (q, k, v))
            if caches:
                k, v = caches[i]
                a = f.scaled_dot_product_attention(q, k, v)
            else:
                a = f.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(seqs, tokens, h) @ w["o"].T
            g, u = (rms(x) @ w["gate_up"].T).chunk(2, dim=-1)
            x = x + (f.silu(g) * u) @ w["down"].T
        return rms(x[:, -1]) @ head.T

    return step


def encoder_step(shape: EncoderShape, batch: int, seq: int, device: str, dtype: Any) -> Callable[[], Any]:
    """A closure running one embedding batch: `batch` inputs of `seq` tokens through the encoder."""
    torch = _torch()
    f = torch.nn.functional
    h, nh = shape.hidden, shape.heads
    hd = h // nh
    layers = [
        {
            "qkv": _weights(torch, (3 * h, h), device, dtype),
            "o": _weights(torch, (h, h), device, dtype),
            "up": _weights(torch, (shape.ffn, h), device, dtype),
            "down": _weights(torch, (h, shape.ffn), device, dtype),
        }
        for _ in range(shape.layers)
    ]
    x0 = _weights(torch, (batch, seq, h), device, dtype)

    def step() -> Any:
        x = x0
        for w in layers:
            q, k, v = (x @ w["qkv"].T).split(h, dim=-1)
            q, k, v = (t.view(batch, seq, nh, hd).transpose(1, 2) for t in (q, k, v))
            a = f.scaled_dot_product_attention(q, k, v)
            x = f.layer_norm(x + a.transpose(1, 2).reshape(batch, seq, h) @ w["o"].T, (h,))
            x = f.layer_norm(x + f.gelu(x @ w["up"].T) @ w["down"].T, (h,))
        return x[:, 0]

    return step


class Runner:
    """One workload on its own stream (on a GPU), as a graph when asked: `run(seconds)` times
    back-to-back steps, synchronising after each."""

    def __init__(self, step: Callable[[], Any], device: str, graphs: bool) -> None:
        self.torch = _torch()
        self.cuda = device.startswith("cuda")
        self.stream = self.torch.cuda.Stream() if self.cuda else None
        self.step = step
        with self._on_stream():
            for _ in range(3):  # warm-up (kernel selection, allocator)
                step()
        if self.cuda and graphs:
            self.torch.cuda.synchronize()
            graph = self.torch.cuda.CUDAGraph()
            with self.torch.cuda.graph(graph, stream=self.stream):
                step()
            self.step = graph.replay
        self._sync()

    def _on_stream(self) -> Any:
        return self.torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def run(self, seconds: float, start: threading.Barrier | None = None) -> list[float]:
        times: list[float] = []
        with self._on_stream(), self.torch.inference_mode():
            if start is not None:
                start.wait()
            end = time.perf_counter() + seconds
            while (t0 := time.perf_counter()) < end:
                self.step()
                self._sync()
                times.append(time.perf_counter() - t0)
        return times


@dataclass(frozen=True)
class Setup:
    """Everything a process needs to build the two workloads."""

    device: str
    dtype: str
    tiny: bool
    graphs: bool
    llm_work: str
    batch: int
    context: int
    chunk: int
    embed_batch: int
    embed_seq: int

    def build(self, which: str) -> Runner:
        torch = _torch()
        dtype = getattr(torch, self.dtype)
        with torch.inference_mode():
            if which == "llm":
                shape = TINY_DECODER if self.tiny else DecoderShape()
                step = decoder_step(shape, self.llm_work, self.batch, self.context, self.chunk, self.device, dtype)
            else:
                step = encoder_step(
                    TINY_ENCODER if self.tiny else EncoderShape(), self.embed_batch, self.embed_seq, self.device, dtype
                )
            return Runner(step, self.device, self.graphs)


def _in_one_process(setup: Setup, seconds: float) -> dict[str, float]:
    """Alone, then on two streams of one process (two threads), medians in ms."""
    llm, emb = setup.build("llm"), setup.build("embedding")
    out = {"llm_alone_ms": summarise(llm.run(seconds)) * 1e3, "embedding_alone_ms": summarise(emb.run(seconds)) * 1e3}
    start = threading.Barrier(2)
    got: dict[str, list[float]] = {}
    threads = [
        threading.Thread(target=lambda name=name, r=r: got.__setitem__(name, r.run(seconds, start)))
        for name, r in (("llm", llm), ("embedding", emb))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["llm_streams_ms"] = summarise(got["llm"]) * 1e3
    out["embedding_streams_ms"] = summarise(got["embedding"]) * 1e3
    return out


def _child(setup: Setup, which: str, seconds: float, phases: Any, results: Any) -> None:
    """One engine of the two-process measurement: alone in its phase, then beside the other."""
    runner = setup.build(which)
    phases.wait()  # both built
    if which == "llm":
        results.put(("llm_alone", runner.run(seconds)))
    phases.wait()
    if which == "embedding":
        results.put(("embedding_alone", runner.run(seconds)))
    phases.wait()  # then both together
    results.put((f"{which}_processes", runner.run(seconds)))


def _in_two_processes(setup: Setup, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    phases, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(setup, which, seconds, phases, results)) for which in ("llm", "embedding")
    ]
    for p in procs:
        p.start()
    got: dict[str, list[float]] = {}
    while len(got) < 4:
        try:
            name, times = results.get(timeout=5)
            got[name] = times
        except queue.Empty:
            if failed := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a measuring process exited with {failed[0]} (its traceback is above)") from None
    for p in procs:
        p.join(timeout=60)
    return {
        "llm_alone_ms": summarise(got["llm_alone"]) * 1e3,
        "embedding_alone_ms": summarise(got["embedding_alone"]) * 1e3,
        "llm_processes_ms": summarise(got["llm_processes"]) * 1e3,
        "embedding_processes_ms": summarise(got["embedding_processes"]) * 1e3,
    }


def stretches(times: dict[str, float], mode: str) -> dict[str, Any]:
    """The two stretches of one mode and the engine-model fields that reproduce them."""
    s_llm = times[f"llm_{mode}_ms"] / times["llm_alone_ms"]
    s_emb = times[f"embedding_{mode}_ms"] / times["embedding_alone_ms"]
    return {
        "llm_stretch": round(s_llm, 4),
        "embedding_stretch": round(s_emb, 4),
        "shared_gpu": shared_gpu_config(s_llm, s_emb),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the code path)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (for --device cpu)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager steps instead of CUDA graphs")
    p.add_argument("--llm-work", default="decode,prefill", help="decode, prefill or both (comma-separated)")
    p.add_argument("--batch", type=int, default=32, help="decode batch (sequences)")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per decoding sequence")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    p.add_argument("--embed-batch", type=int, default=32, help="embedding batch (inputs)")
    p.add_argument("--embed-seq", type=int, default=512, help="tokens per embedding input")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    p.add_argument("--modes", default="streams,processes", help="streams, processes or both")
    args = p.parse_args(argv)
    torch = _torch()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu --tiny for a smoke test")
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - {"streams", "processes"}:
        raise SystemExit(f"unknown --modes {sorted(unknown)}: use streams and/or processes")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "decoder": asdict(TINY_DECODER if args.tiny else DecoderShape()),
        "encoder": asdict(TINY_ENCODER if args.tiny else EncoderShape()),
        "results": {},
    }
    for work in [w for w in args.llm_work.split(",") if w]:
        setup = Setup(
            args.device, args.dtype, args.tiny, args.graphs, work, args.batch, args.context, args.chunk,
            args.embed_batch, args.embed_seq,
        )  # fmt: skip
        entry: dict[str, Any] = {}
        if "streams" in modes:
            times = _in_one_process(setup, args.seconds)
            entry["streams"] = {"times_ms": times, **stretches(times, "streams")}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the two-process run's LLM process needs the memory
        if "processes" in modes:
            times = _in_two_processes(setup, args.seconds)
            entry["processes"] = {"times_ms": times, **stretches(times, "processes")}
        report["results"][work] = entry
        for mode, r in entry.items():
            print(
                f"{work:8s} {mode:10s} LLM x{r['llm_stretch']:.2f}  embedding x{r['embedding_stretch']:.2f}  -> {r['shared_gpu']}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return (
        0
        if all(math.isfinite(v) for e in report["results"].values() for r in e.values() for v in r["times_ms"].values())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
