"""The `sagesched` console script: a thin dispatcher to the subcommands' own modules.

Each subcommand module exposes `main(argv: list[str]) -> int`; importing lazily keeps
`sagesched --help` fast and lets users without the `live` extra run the simulator commands.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "inference": ("sagesched.live.inference_cli", "start/stop/inspect the UnifiedAPIServer gateway"),
    "emulate": ("sagesched.live.emulators.cli", "run a vLLM or TEI emulator driven by the engine model"),
    "backends": ("sagesched.live.real_backends", "install/start/stop real CPU backends (llama-server)"),
    "calibrate": ("sagesched.calibrate.cli", "fit the performance model to measured runs or a live server"),
    "fit": ("sagesched.sim.fit", "report the performance model's fit error against the profiles"),
    "experiment": ("sagesched.experiment", "run a simulation experiment (Hydra overrides follow)"),
    "report": ("sagesched.report", "aggregate a sweep directory into a report"),
    "compare": ("sagesched.replay.compare", "compare two runs (sim/live/imported): paired per request, side by side"),
    "import": ("sagesched.replay.import_cli", "read vllm-bench / AIPerf / inference-perf results into a run folder"),
    "export": ("sagesched.replay.export_cli", "write a run as a vllm-bench result or an inference-perf summary"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: sagesched <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from sagesched import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"sagesched: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
