"""Local process and port management for the servers live mode starts: one implementation, on psutil.

The gateway CLI (`sagesched inference start|stop|status`), the emulator runner and the tests all
need the same few things: is a pid alive (a zombie is not), is it ours (a reused pid is not), stop
it politely then firmly, find a free port, say why a port cannot be bound, and wait for a server's
health route. psutil answers the process questions portably (no /proc parsing, no signal 0 tricks).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
import time

import httpx
import psutil

HOST = "127.0.0.1"


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a child that exited and was not reaped is gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def cmdline_contains(pid: int, needle: str) -> bool:
    """Whether `pid`'s command line mentions `needle` (guards against a stale pid file's reused pid).

    When the command line cannot be read (another user's process), liveness is all we can say.
    """
    try:
        return needle in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return is_alive(pid)


def terminate(pid: int, timeout_s: float = 10.0) -> bool:
    """SIGTERM `pid`, wait up to `timeout_s`, then SIGKILL. Returns True if it stopped by itself.

    Waits by polling rather than with `psutil.Process.wait`, which reaps a child of ours: the
    `subprocess.Popen` that started it must still see the real exit status.
    """
    try:
        process = psutil.Process(pid)
        process.terminate()
    except psutil.NoSuchProcess:
        return True
    if _gone_within(pid, timeout_s):
        return True
    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()
    _gone_within(pid, timeout_s)
    return False


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_problem(host: str, port: int) -> str | None:
    """A message saying why `host:port` cannot be bound (and what to do), or None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use by another program; "
                    f"choose another with --port, or stop whatever listens there (`ss -ltnp 'sport = :{port}'` shows it)"
                )
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"cannot bind {host}: no such local address; use 127.0.0.1 or an address of this machine"
            if exc.errno == errno.EACCES:
                return f"no permission to bind port {port}; use a port above 1023"
            return f"cannot bind {host}:{port}: {exc.strerror}"
    return None


def http_status(url: str, timeout_s: float = 1.0) -> str:
    """'ok' when GET `url` answers 2xx within `timeout_s`; else what happened ('HTTP 503: ...', 'ConnectError')."""
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return "ok" if 200 <= response.status_code < 300 else f"HTTP {response.status_code}: {response.text[:200]}"


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """GET `url` answers 2xx within `timeout_s`."""
    return http_status(url, timeout_s) == "ok"


def wait_http_ok(
    url: str,
    timeout_s: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    what: str = "server",
    error: type[Exception] = RuntimeError,
) -> None:
    """Poll `url` until it answers 2xx; `error` naming the URL, the exit code or the last answer otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise error(f"{what} at {url} exited with code {process.returncode} before becoming healthy")
        last = http_status(url, timeout_s=2.0)
        if last == "ok":
            return
        time.sleep(0.05)
    raise error(f"{what} at {url} not healthy after {timeout_s:.0f}s (last: {last})")


__all__ = [
    "cmdline_contains",
    "free_port",
    "http_ok",
    "http_status",
    "is_alive",
    "port_problem",
    "terminate",
    "wait_http_ok",
]
