"""Session-wide fixtures: real llama-server backends and backend emulators; `load_script` for the
experiment and benchmark scripts (files outside the package) that tests import.

Real backends are never skipped: a missing llama-server or model is a broken test environment,
and the failure names the install step (the README's test command performs it). Before the first
test runs, if any selected test needs a real backend, the installed llama-server is run once
(`real_backends.check_backends`); if it cannot load the model and generate, the session stops with
that one message instead of erroring in every backend test.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sagesched.live import real_backends as rb

BACKEND_FIXTURES = frozenset({"llm_server", "embedding_server", "start_llm_server"})
REPO = Path(__file__).resolve().parents[1]


def _import_script(relative_path: str) -> ModuleType:
    """Import a script of this repository (e.g. ``benchmarks/gpu_colocation.py``) as a module,
    registered in ``sys.modules`` under its path (dataclasses look their module up there)."""
    path = REPO / relative_path
    name = "script_" + relative_path.removesuffix(".py").replace("/", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """`_import_script`: tests of the experiment and benchmark scripts take their module from it."""
    return _import_script


def pytest_collection_finish(session: pytest.Session) -> None:
    needs_backend = any(
        BACKEND_FIXTURES.intersection(getattr(item, "fixturenames", ())) or item.get_closest_marker("backends")
        for item in session.items
    )
    if not needs_backend or session.config.option.collectonly:
        return
    try:
        rb.check_backends()
    except rb.BackendCheckError as exc:
        pytest.exit(f"real backend check failed before any test ran:\n{exc}", returncode=3)


def _start_or_fail(**kwargs: Any) -> rb.RunningServer:
    try:
        return rb.start_llama_server(**kwargs)
    except rb.BackendNotInstalled as exc:
        pytest.fail(f"real backend missing: {exc}", pytrace=False)
    except rb.BackendStartError as exc:
        pytest.fail(f"llama-server failed to start: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def llm_server() -> Iterator[rb.RunningServer]:
    """A real llama-server (Gemma 3 270M, 4 slots, continuous batching, --metrics), shared by the session."""
    server = _start_or_fail(parallel=4)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedding_server() -> Iterator[rb.RunningServer]:
    """A real llama-server in embedding mode (mean pooling, one slot), shared by the session.

    One slot because llama-server with several embedding slots returned a different vector for
    the same text depending on its batch neighbours; with one slot results are exact and
    batch-independent, which the merged-batch tests rely on.
    """
    server = _start_or_fail(embeddings=True, parallel=1)
    yield server
    server.stop()


@pytest.fixture
def start_llm_server() -> Iterator[Callable[..., rb.RunningServer]]:
    """Factory for extra llama-server instances (a second LLM, one to kill mid-run); all stopped at teardown.

    Takes `start_llama_server`'s keywords, e.g. `start_llm_server(parallel=2)` or `(embeddings=True)`.
    """
    started: list[rb.RunningServer] = []

    def start(**kwargs: Any) -> rb.RunningServer:
        server = _start_or_fail(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def emulator() -> Iterator[Callable[..., Any]]:
    """Factory for backend emulators: `emulator("vllm", time_scale=0.1, max_num_seqs=8)` or `emulator("tei")`.

    Returns a `RunningEmulator` (url, model, port, stop(), kill()). By default the emulator runs in a
    thread of this process (fast); `subprocess=True` runs `sagesched emulate` as a real process,
    for tests that kill a backend. All are stopped at teardown.
    """
    from sagesched.live.emulators.runner import start_emulator

    started: list[Any] = []

    def start(kind: str = "vllm", **kwargs: Any) -> Any:
        running = start_emulator(kind, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
