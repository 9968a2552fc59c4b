"""`sagesched inference start|status|stop|logs`: run the gateway in the foreground or as a daemon.

State lives in a per-user directory (``$SAGESCHED_STATE_DIR``, else ``$XDG_STATE_HOME/sagesched``,
else ``~/.local/state/sagesched``): ``gateway.pid`` (the server's pid), ``gateway.json`` (pid, url,
config, log path, start time) and ``gateway.log`` (the background server's output). One gateway per
state directory; a second `start` is refused with the command that stops the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from sagesched.live.gateway_config import GatewayConfig, GatewayConfigError, load_gateway_config
from sagesched.live.processes import cmdline_contains, is_alive, port_problem, terminate
from sagesched.typed_config import ConfigFieldError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3  # the LSB code for "program is not running" (what `status` returns then)


def state_dir() -> Path:
    """Where the pid, state and log files live; created on demand with user-only permissions."""
    override = os.environ.get("SAGESCHED_STATE_DIR")
    if override:
        path = Path(override)
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "sagesched"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _files() -> tuple[Path, Path, Path]:
    d = state_dir()
    return d / "gateway.pid", d / "gateway.json", d / "gateway.log"


# -- process bookkeeping ---------------------------------------------------------------------------


def read_state() -> dict[str, Any] | None:
    """The running gateway's state, or None (stale files of a dead server are removed)."""
    pid_file, state_file, _ = _files()
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        pid_file.unlink(missing_ok=True)
        return None
    if not is_alive(pid) or not cmdline_contains(pid, "sagesched"):
        pid_file.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
        return None
    state: dict[str, Any] = {"pid": pid}
    with contextlib.suppress(OSError, ValueError):
        state.update(json.loads(state_file.read_text()))
    state["pid"] = pid
    return state


def _write_state(config: GatewayConfig, config_path: str) -> None:
    pid_file, state_file, log_file = _files()
    state = {
        "pid": os.getpid(),
        "url": config.url,
        "host": config.host,
        "port": config.port,
        "workers": config.workers,
        "config": str(Path(config_path).resolve()),
        "log": str(log_file),
        "started_at": time.time(),
        "admin_key_required": config.admin_key is not None,
    }
    state_file.write_text(json.dumps(state, indent=2))
    pid_file.write_text(f"{os.getpid()}\n")


def _clear_state() -> None:
    pid_file, state_file, _ = _files()
    with contextlib.suppress(OSError, ValueError):
        if int(pid_file.read_text().strip()) != os.getpid():
            return
    pid_file.unlink(missing_ok=True)
    state_file.unlink(missing_ok=True)


def _already_running_message(state: dict[str, Any]) -> str:
    return (
        f"a sagesched gateway is already running (pid {state['pid']}, {state.get('url', '?')}); "
        f"stop it with `sagesched inference stop`, or point SAGESCHED_STATE_DIR elsewhere to run a second one"
    )


# -- commands --------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> GatewayConfig:
    config = load_gateway_config(args.config)
    try:
        return config.with_overrides(port=args.port, host=args.host, workers=args.workers, log_level=args.log_level)
    except ConfigFieldError as exc:  # a command-line value out of range: name the flag, not a traceback
        flag = f"--{str(exc.path[0]).replace('_', '-')}" if exc.path else "a command-line option"
        raise GatewayConfigError(f"{flag}: {exc.message}") from None


def cmd_start(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except GatewayConfigError as exc:
        print(f"sagesched inference: {exc}", file=sys.stderr)
        return EXIT_USAGE
    state = read_state()
    if state is not None:
        print(f"sagesched inference: {_already_running_message(state)}", file=sys.stderr)
        return EXIT_ERROR
    problem = port_problem(config.host, config.port)
    if problem:
        print(f"sagesched inference: {problem}", file=sys.stderr)
        return EXIT_ERROR
    if args.background:
        return _start_background(args, config)
    return _serve_foreground(args.config, config)


def _serve_foreground(config_path: str, config: GatewayConfig) -> int:
    from sagesched.live.server import serve

    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO) if config.log_level != "trace" else 5,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _write_state(config, config_path)
    try:
        serve(config)
    except OSError as exc:
        log.error("gateway failed to start: %s", exc)
        return EXIT_ERROR
    finally:
        _clear_state()
    return EXIT_OK


def _start_background(args: argparse.Namespace, config: GatewayConfig) -> int:
    _, _, log_file = _files()
    command = [sys.executable, "-m", "sagesched.live.inference_cli", "start", "--config", str(args.config)]
    command += ["--port", str(config.port), "--host", config.host, "--workers", str(config.workers)]
    with open(log_file, "ab") as out:
        out.write(f"\n--- sagesched inference start {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + args.wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(
                f"sagesched inference: the gateway exited during start (code {proc.returncode}); "
                f"last lines of {log_file}:\n{_tail(log_file, 20)}",
                file=sys.stderr,
            )
            return EXIT_ERROR
        if _healthy(config.url):
            print(f"sagesched gateway running: pid {proc.pid}, {config.url} (logs: {log_file})")
            return EXIT_OK
        time.sleep(0.1)
    print(
        f"sagesched inference: the gateway (pid {proc.pid}) did not answer {config.url}/health within {args.wait_s:.0f} s; "
        f"see `sagesched inference logs`",
        file=sys.stderr,
    )
    return EXIT_ERROR


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        info: dict[str, Any] = {"running": False}
        if args.json:
            print(json.dumps(info))
        else:
            print("sagesched gateway: not running (start it with `sagesched inference start --config FILE`)")
        return EXIT_NOT_RUNNING
    info = {"running": True, **state}
    url = state.get("url")
    if url:
        info.update(_probe(url))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        ready = info.get("ready")
        lines = [
            f"sagesched gateway: running (pid {state['pid']})",
            f"  url:      {url}",
            f"  healthy:  {info.get('healthy')}",
            f"  ready:    {ready}"
            + (
                f" ({info.get('healthy_backends')}/{info.get('backends')} backends healthy)"
                if "backends" in info
                else ""
            ),
            f"  models:   {', '.join(info.get('models', [])) or '?'}",
            f"  config:   {state.get('config')}",
            f"  log:      {state.get('log')}",
            f"  uptime:   {time.time() - float(state.get('started_at', time.time())):.0f} s",
        ]
        print("\n".join(lines))
    return EXIT_OK


def _probe(url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"healthy": False, "ready": False}
    try:
        with httpx.Client(timeout=2.0) as client:
            out["healthy"] = client.get(f"{url}/health").status_code == 200
            ready = client.get(f"{url}/ready")
            out["ready"] = ready.status_code == 200
            with contextlib.suppress(ValueError):
                body = ready.json()
                backends = body.get("backends", [])
                out["backends"] = len(backends)
                out["healthy_backends"] = sum(1 for b in backends if b.get("healthy"))
                out["models"] = body.get("models", [])
    except httpx.HTTPError as exc:
        out["error"] = str(exc)
    return out


def cmd_stop(args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("sagesched gateway: not running")
        return EXIT_OK
    pid = int(state["pid"])
    if not terminate(pid, args.timeout):
        print(f"sagesched gateway (pid {pid}) did not stop within {args.timeout:.0f} s; killed it", file=sys.stderr)
    pid_file, state_file, _ = _files()
    pid_file.unlink(missing_ok=True)
    state_file.unlink(missing_ok=True)
    print(f"sagesched gateway stopped (pid {pid})")
    return EXIT_OK


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def cmd_logs(args: argparse.Namespace) -> int:
    _, _, log_file = _files()
    if not log_file.exists():
        print(f"no log yet at {log_file} (only a background server writes one: `start --background`)", file=sys.stderr)
        return EXIT_ERROR
    if args.lines:
        print(_tail(log_file, args.lines))
    if not args.follow:
        return EXIT_OK
    with open(log_file, "rb") as f:
        f.seek(0, os.SEEK_END)
        try:
            while True:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.25)
        except KeyboardInterrupt:
            return EXIT_OK


def _count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagesched inference", description="Run the sagesched OpenAI-compatible gateway."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the gateway (foreground unless --background)")
    start.add_argument("--config", required=True, help="gateway YAML file (policy, backends, limits)")
    start.add_argument("--port", type=int, default=None, help="TCP port (default: the config's, else 8000)")
    start.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    start.add_argument("--workers", type=int, default=None, help="gateway processes sharing the port (SO_REUSEPORT)")
    start.add_argument("--log-level", default=None, help="critical|error|warning|info|debug")
    start.add_argument("--background", action="store_true", help="detach; logs go to the state directory")
    start.add_argument("--wait-s", type=float, default=30.0, help="with --background: how long to wait for /health")
    status = sub.add_parser("status", help="is a gateway running, and are its backends healthy")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    stop = sub.add_parser("stop", help="stop the gateway, draining in-flight requests")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds before the server is killed")
    logs = sub.add_parser("logs", help="show the background gateway's log")
    logs.add_argument("-n", "--lines", type=_count, default=50, help="how many of the last lines to show (0: none)")
    logs.add_argument("-f", "--follow", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"start": cmd_start, "status": cmd_status, "stop": cmd_stop, "logs": cmd_logs}[args.command]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
