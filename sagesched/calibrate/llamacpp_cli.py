"""`sagesched calibrate llamacpp URL`: probe a running llama-server and write its CPU calibration file.

    sagesched calibrate llamacpp http://127.0.0.1:8001 --model gemma-3-270m --parallel 4 --ctx 8192 --out cpu.yaml
    sagesched calibrate llamacpp http://127.0.0.1:8002 --model gemma-3-270m-embed --embeddings --out embed.yaml

The server settings given here must be the ones the server runs with (`-np`, `-c`, `-b`, `-ub`): the
probes pin requests to slots and the fit builds each probe's batches from them. Nothing else should
be sending to the server meanwhile. The file is what `load_llamacpp_calibration` and `replay_llamacpp`
use; `python -m sagesched.calibrate.live_report` does this and checks it against live runs.
"""

from __future__ import annotations

import argparse
import sys

from sagesched.calibrate import llamacpp_probe as lp
from sagesched.calibrate.llamacpp_client import ServerAnswerError
from sagesched.calibrate.llamacpp_server import ServerSettings


def _usage_error(message: str) -> int:
    print(f"sagesched calibrate llamacpp: {message}", file=sys.stderr)
    return 2


def cmd_llamacpp(args: argparse.Namespace) -> int:
    from sagesched.live.backends import base_url_problem

    if problem := base_url_problem(args.url):
        return _usage_error(f"{problem}; pass the server's base URL, e.g. http://127.0.0.1:8001")
    if args.repeats < 1:
        return _usage_error(f"--repeats: must be >= 1, got {args.repeats}")
    settings = ServerSettings(
        parallel=args.parallel,
        ctx_size=args.ctx,
        n_batch=args.batch,
        n_ubatch=args.ubatch,
        threads=args.threads,
        embeddings=args.embeddings,
        checkpoint_tail_tokens=0 if args.embeddings else args.checkpoint_tail,
    )
    try:
        engine = settings.engine_config()
    except ValueError as exc:  # --parallel 0, --ctx smaller than --parallel, ...
        flags = "--parallel / --ctx / --batch / --ubatch / --threads / --checkpoint-tail"
        return _usage_error(f"{exc}; pass the server's own settings ({flags})")
    try:
        _, result, cal = lp.probe_and_fit(
            args.url,
            args.model,
            engine,
            embeddings=args.embeddings,
            repeats=args.repeats,
            hardware=args.hardware or lp.machine_name(),
            server=settings.as_dict(),
            source=f"sagesched calibrate llamacpp {args.url}",
        )
    except ServerAnswerError as exc:
        print(
            f"sagesched calibrate llamacpp: {exc}; check that llama-server runs at {args.url} and answers to "
            f"--model {args.model}",
            file=sys.stderr,
        )
        return 1
    cal.write(args.out)
    print(f"coefficients: {result['coefficients']}")
    print(
        f"mean |residual| {result['mean_abs_residual']}, leave-one-probe-out {result['mean_abs_leave_one_out']}, "
        f"leave-one-kind-out {result['mean_abs_leave_one_kind_out']}"
    )
    print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("llamacpp", help="probe a running llama-server and fit its CPU step model")
    p.add_argument("url", help="base URL of a llama-server you run, e.g. http://127.0.0.1:8001")
    p.add_argument("--model", required=True, help="the model name (alias) the server answers to")
    p.add_argument("--parallel", type=int, default=4, help="the server's -np")
    p.add_argument("--ctx", type=int, default=8192, help="the server's -c (total context)")
    p.add_argument("--batch", type=int, default=2048, help="the server's -b")
    p.add_argument("--ubatch", type=int, default=512, help="the server's -ub")
    p.add_argument("--threads", type=int, default=1, help="the server's -t (recorded in the file)")
    p.add_argument(
        "--checkpoint-tail",
        type=int,
        default=4,
        help="tokens llama-server keeps for a second step after a context checkpoint (4 for sliding-window "
        "models such as Gemma 3; 0 for models without)",
    )
    p.add_argument("--embeddings", action="store_true", help="an embedding server (--embeddings, one slot)")
    p.add_argument("--hardware", default="", help="a name for this CPU (default: from /proc/cpuinfo)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True, help="calibration file to write (YAML)")
    p.set_defaults(func=cmd_llamacpp)
