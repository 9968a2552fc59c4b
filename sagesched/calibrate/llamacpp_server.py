"""Start the shipped llama-server pinned to chosen CPUs, for calibration and live fidelity runs.

Why pinning: on a small shared machine a server whose threads float between cores competes with the
load generator and with whatever else runs, and its step times change from run to run. Pinning the
server (every thread it creates inherits the mask set before `exec`) to one set of CPUs and the client
to the others makes two identical runs agree much more closely; the live report states both the masks
and the load average of each run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sagesched.live import real_backends as rb
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


def start_server(
    settings: ServerSettings, cpus: frozenset[int] | None = None, log_path: str | Path | None = None
) -> rb.RunningServer:
    """Launch llama-server with `settings` on a free loopback port, its threads confined to `cpus`."""
    extra: tuple[str, ...] = ()
    if not settings.embeddings:
        extra = ("-b", str(settings.n_batch), "-ub", str(settings.n_ubatch))
    return rb.start_llama_server(
        embeddings=settings.embeddings,
        parallel=settings.parallel,
        ctx_size=settings.ctx_size,
        threads=settings.threads,
        extra_args=extra,
        log_path=log_path,
        cpus=cpus,
    )


def split_cpus() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(server CPUs, client CPUs): the last CPU for the server, the rest for the client; None on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return frozenset(cpus[-1:]), frozenset(cpus[:-1])
