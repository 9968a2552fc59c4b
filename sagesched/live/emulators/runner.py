"""Start an emulator on 127.0.0.1 from Python: in a thread of this process, or as a real process.

The thread form starts in a fraction of a second and is what most tests use; the process form
(`sagesched emulate ...`) is for tests that must kill a backend abruptly, and for demos.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn

from sagesched.live.processes import free_port, wait_http_ok

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def wait_healthy(url: str, timeout_s: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `/health` until 200; RuntimeError naming the URL (and exit code) otherwise."""
    wait_http_ok(f"{url}/health", timeout_s, process, what="emulator")


@dataclass
class RunningEmulator:
    """A started emulator; `.stop()` shuts it down gracefully, `.kill()` abruptly (process form only)."""

    kind: str
    url: str
    model: str
    port: int
    app: Any = None
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    process: subprocess.Popen[bytes] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def emulator(self) -> Any:
        """The in-process emulator object (engine loop, metrics); None for the process form."""
        return None if self.app is None else self.app.state.emulator

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(timeout_s)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the emulator process: connections drop mid-response, as when a backend crashes."""
        if self.process is None:
            raise RuntimeError("kill() needs an emulator started with subprocess=True")
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def build_app(kind: str, **options: Any) -> tuple[Any, str]:
    """The Starlette app for `kind` ("vllm" or "tei") and its served model name.

    Options are the emulator config's fields (model, hardware, time_scale, ...) plus the engine
    config's (max_num_seqs, max_batch_tokens, ...), read through the typed config layer: a wrong type
    is a ConfigFieldError naming the option; unknown names raise the engine config's error.
    """
    from dataclasses import fields

    from sagesched.typed_config import from_mapping

    if kind == "vllm":
        from sagesched.live.emulators.vllm_app import VllmEmulatorConfig, build_vllm_app

        names = {f.name for f in fields(VllmEmulatorConfig)}
        config = from_mapping(VllmEmulatorConfig, {k: v for k, v in options.items() if k in names}, "emulator")
        return build_vllm_app(config, **{k: v for k, v in options.items() if k not in names}), config.name
    if kind == "tei":
        from sagesched.live.emulators.tei_app import TeiEmulatorConfig, build_tei_app

        names = {f.name for f in fields(TeiEmulatorConfig)}
        tei_config = from_mapping(TeiEmulatorConfig, {k: v for k, v in options.items() if k in names}, "emulator")
        return build_tei_app(tei_config, **{k: v for k, v in options.items() if k not in names}), tei_config.name
    raise ValueError(f"unknown emulator kind {kind!r}; use 'vllm' or 'tei'")


def start_emulator(
    kind: str = "vllm", *, port: int | None = None, subprocess: bool = False, **options: Any
) -> RunningEmulator:
    """Start an emulator on 127.0.0.1 (a free port if none given) and wait for `/health`."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    if subprocess:
        return _start_process(kind, port, url, options)
    app, model = build_app(kind, **options)
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"{kind}-emulator-{port}", daemon=True)
    thread.start()
    running = RunningEmulator(kind, url, model, port, app=app, server=server, thread=thread, options=options)
    try:
        wait_healthy(url)
    except RuntimeError:
        running.stop()
        raise
    return running


def _start_process(kind: str, port: int, url: str, options: dict[str, Any]) -> RunningEmulator:
    import subprocess as sp

    args = [sys.executable, "-m", "sagesched.live.emulators.cli", kind, "--port", str(port)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    process = sp.Popen(args, stdin=sp.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    model = str(
        options.get("served_model_name") or options.get("model") or ("llama-2-7b" if kind == "vllm" else "bge-base")
    )
    running = RunningEmulator(kind, url, model, port, process=process, options=options)
    try:
        wait_healthy(url, timeout_s=60, process=process)
    except RuntimeError:
        running.stop()
        raise
    return running
