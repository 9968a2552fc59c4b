"""Start the shipped llama-server pinned to chosen CPUs, for calibration and live fidelity runs.

Why pinning: on a small shared machine a server whose threads float between cores competes with the
load generator and with whatever else runs, and its step times change from run to run. Pinning the
server (every thread it creates inherits the mask set before `exec`) to one set of CPUs and the client
to the others makes two identical runs agree much more closely; the live report states both the masks
and the load average of each run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sagesched.live import real_backends as rb
from sagesched.live.processes import free_port
from sagesched.sim.engines.llamacpp import LlamaCppConfig


@dataclass(frozen=True)
class ServerSettings:
    """The llama-server knobs a calibration is tied to (the simulator must use the same ones)."""

    parallel: int = 4
    ctx_size: int = 8192
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int = 1
    embeddings: bool = False
    #: Gemma 3 has sliding-window attention: llama-server checkpoints before a prompt's last 4 tokens.
    checkpoint_tail_tokens: int = 4

    def engine_config(self) -> LlamaCppConfig:
        return LlamaCppConfig(
            n_parallel=self.parallel,
            n_ctx=self.ctx_size,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            embeddings=self.embeddings,
            checkpoint_tail_tokens=self.checkpoint_tail_tokens,
        )

    @classmethod
    def from_dict(cls, d: dict) -> ServerSettings:
        """The inverse of `as_dict` (what calibration files and live.json record)."""
        return cls(
            parallel=int(d["n_parallel"]),
            ctx_size=int(d["n_ctx"]),
            n_batch=int(d["n_batch"]),
            n_ubatch=int(d["n_ubatch"]),
            threads=int(d.get("threads", 1)),
            embeddings=bool(d.get("embeddings", False)),
            checkpoint_tail_tokens=int(d.get("checkpoint_tail_tokens", 0)),
        )

    def as_dict(self) -> dict:
        return {
            "n_parallel": self.parallel,
            "n_ctx": self.ctx_size,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "threads": self.threads,
            "embeddings": self.embeddings,
            "checkpoint_tail_tokens": self.checkpoint_tail_tokens,
        }


def embedding_settings(threads: int = 1) -> ServerSettings:
    """The embedding server as `real_backends` starts it: one slot, 2048 context, one batch per input."""
    ctx = rb.DEFAULT_SLOT_CONTEXT
    return ServerSettings(parallel=1, ctx_size=ctx, n_batch=ctx, n_ubatch=ctx, threads=threads, embeddings=True)


def _pin_and_die_with_parent(cpus: frozenset[int] | None):  # type: ignore[no-untyped-def]
    def pre() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return pre


def start_server(
    settings: ServerSettings, cpus: frozenset[int] | None = None, log_path: str | Path | None = None
) -> rb.RunningServer:
    """Launch llama-server with `settings` on a free loopback port, its threads confined to `cpus`."""
    port = free_port(rb.HOST)
    extra: tuple[str, ...] = ()
    if not settings.embeddings:
        extra = ("-b", str(settings.n_batch), "-ub", str(settings.n_ubatch))
    cmd = rb.llama_server_command(
        port=port,
        embeddings=settings.embeddings,
        parallel=settings.parallel,
        ctx_size=settings.ctx_size,
        threads=settings.threads,
        extra_args=extra,
    )
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"llama-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin_and_die_with_parent(cpus),
        )
    server = rb.RunningServer(
        url=f"http://{rb.HOST}:{port}",
        model=cmd[cmd.index("--alias") + 1],
        process=proc,
        port=port,
        embeddings=settings.embeddings,
        log_path=log_path,
        command=cmd,
    )
    try:
        rb.wait_healthy(server.url, proc, 120.0)
    except rb.BackendStartError as exc:
        server.stop(timeout_s=5)
        raise rb.BackendStartError(f"{exc}\n--- {log_path} (tail) ---\n{server.log_tail()}") from None
    return server


def split_cpus() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(server CPUs, client CPUs): the last CPU for the server, the rest for the client; None on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return frozenset(cpus[-1:]), frozenset(cpus[:-1])
