"""Fixtures for the gateway tests: a gateway (in a thread of this process) in front of given backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.server import UnifiedAPIServer


def gateway_config(backends: list[dict[str, Any]], **knobs: Any) -> GatewayConfig:
    return GatewayConfig.from_dict({"policy": knobs.pop("policy", "fifo"), "backends": backends, **knobs})


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., UnifiedAPIServer]]:
    """Factory: `start_gateway(backends, max_queue=2, ...)` -> a started UnifiedAPIServer on a free port."""
    started: list[UnifiedAPIServer] = []

    def start(backends: list[dict[str, Any]], executor: dict[str, Any] | None = None, **knobs: Any) -> UnifiedAPIServer:
        if executor:
            knobs["executor"] = executor
        server = UnifiedAPIServer(gateway_config(backends, **knobs), port=0).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fake_backend() -> Iterator[Callable[..., Any]]:
    """Factory: `fake_backend(handler, metrics_text="")` -> a started FakeBackend (tests/gateway/fake_backend.py)."""
    from tests.gateway.fake_backend import FakeBackend

    started: list[FakeBackend] = []

    def start(handler: Any, metrics_text: str = "") -> FakeBackend:
        fb = FakeBackend(handler, metrics_text).start()
        started.append(fb)
        return fb

    yield start
    for fb in started:
        fb.stop()
