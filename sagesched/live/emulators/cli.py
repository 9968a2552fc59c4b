"""`sagesched emulate vllm|tei ...`: serve an emulated backend on 127.0.0.1 until interrupted.

sagesched emulate vllm --model llama-2-7b --hardware a100 --port 8000 [--max-num-seqs 256] [--time-scale 1.0]
sagesched emulate tei --model bge-base --port 8080 [--max-batch-tokens 16384] [--max-client-batch-size 32]
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _port(text: str) -> int:
    """A TCP port 1-65535 (uvicorn would wrap 70000 round to another port, and take -1 as a name)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _time_scale(text: str) -> float:
    """Wall seconds per engine second: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number >= 0 (0 = zero latency)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagesched emulate", description="run a vLLM or TEI emulator driven by the simulator's engine model"
    )
    sub = parser.add_subparsers(dest="kind", required=True)

    def common(p: argparse.ArgumentParser, model: str) -> None:
        p.add_argument(
            "--model", default=model, help="performance-model key (see sagesched.sim.perf_model.available_models())"
        )
        p.add_argument("--hardware", default="a100", help="a hardware profile: a100, h100 or h200")
        p.add_argument("--port", type=_port, required=True)
        p.add_argument("--host", default="127.0.0.1", help="loopback only: 127.0.0.1, localhost or ::1")
        p.add_argument("--served-model-name", default=None, help="the name clients send (default: --model)")
        p.add_argument(
            "--time-scale", type=_time_scale, default=1.0, help="wall seconds per engine second; 0 = zero latency"
        )
        p.add_argument("--embedding-dim", type=int, default=None, help="vector length (default: the model's)")
        p.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS)

    vllm = sub.add_parser("vllm", help="an OpenAI-compatible vLLM (v1 engine) emulator")
    common(vllm, "llama-2-7b")
    vllm.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    vllm.add_argument("--max-num-seqs", type=int, default=None, help="sequences per step (vLLM's --max-num-seqs)")
    vllm.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=None)
    vllm.add_argument("--tensor-parallel-size", type=int, default=1)
    vllm.add_argument("--no-legacy-metrics", action="store_true", help="export only vLLM v1 metric names")
    vllm.add_argument(
        "--mean-output-tokens",
        type=float,
        default=None,
        help="mean sampled output length (end of sequence); 0 = always run to max_tokens (default 200)",
    )

    tei = sub.add_parser("tei", help="a text-embeddings-inference emulator")
    common(tei, "bge-base")
    tei.add_argument("--max-input-length", type=int, default=None, help="tokens per input (default: the model's)")
    tei.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per batch (TEI default 16384)")
    tei.add_argument("--max-concurrent-requests", type=int, default=None, help="past this: 429 (TEI default 512)")
    tei.add_argument(
        "--max-client-batch-size", type=int, default=None, help="inputs per call; past this: 413 (default 32)"
    )
    tei.add_argument("--max-batch-requests", type=int, default=None)
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options `runner.build_app` takes, from parsed CLI arguments (None = the default)."""
    skip = {"kind", "port", "host", "log_level", "no_legacy_metrics"}
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if args.kind == "vllm":
        options["legacy_metrics"] = not args.no_legacy_metrics
        if "tensor_parallel_size" in options:
            options["tensor_parallel"] = options.pop("tensor_parallel_size")
    return options


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        raise SystemExit(f"--host {args.host!r} is not a loopback address; emulators listen on 127.0.0.1 only")
    level = logging.DEBUG if args.log_level == "trace" else args.log_level.upper()  # trace: uvicorn's, below debug
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from sagesched.live.emulators.runner import build_app

    try:
        app, model = build_app(args.kind, **options_from_args(args))
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"sagesched emulate {args.kind}: {exc}") from None
    logger.warning("%s emulator serving %s on http://%s:%d", args.kind, model, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
