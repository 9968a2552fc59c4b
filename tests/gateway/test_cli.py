"""`sagesched inference start/status/stop/logs` in subprocesses, with the state dir in tmp_path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sagesched.live.real_backends import free_port

pytestmark = pytest.mark.backends


def cli(env, *args, timeout=90):
    return subprocess.run(
        [sys.executable, "-m", "sagesched.cli", "inference", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "SAGESCHED_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
def config_file(tmp_path, llm_server):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "policy: {name: hybrid, embedding_batch_size: 8}\n"
        f"backends:\n  - {{url: '{llm_server.url}', kind: llm, models: [{llm_server.model}]}}\n"
        "log_level: info\n"
    )
    return path


def test_start_status_stop_logs(env, config_file, llm_server, tmp_path):
    port = free_port()
    started = cli(env, "start", "--config", str(config_file), "--port", str(port), "--background")
    assert started.returncode == 0, started.stderr
    assert f"http://127.0.0.1:{port}" in started.stdout
    try:
        status = cli(env, "status", "--json")
        assert status.returncode == 0
        info = json.loads(status.stdout)
        assert info["running"] and info["healthy"] and info["port"] == port
        assert info["models"] == [llm_server.model]
        human = cli(env, "status")
        assert "running" in human.stdout and f":{port}" in human.stdout
        body = {"model": llm_server.model, "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 200
        again = cli(env, "start", "--config", str(config_file), "--port", str(free_port()), "--background")
        assert (
            again.returncode == 1 and "already running" in again.stderr and "sagesched inference stop" in again.stderr
        )
        logs = cli(env, "logs", "-n", "200")
        assert "sagesched gateway ready" in logs.stdout
    finally:
        stopped = cli(env, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    status = cli(env, "status", "--json")
    assert status.returncode == 3 and json.loads(status.stdout) == {"running": False}
    assert not (tmp_path / "state" / "gateway.pid").exists()


def test_port_taken_and_invalid_config_are_clear(env, config_file, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = cli(env, "start", "--config", str(config_file), "--port", str(port), "--background")
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and "--port" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_file.read_text().replace("kind: llm", "kind: lm"))
    result = cli(env, "start", "--config", str(bad))
    assert result.returncode == 2
    assert (
        f"{bad} line 3: backends[0].kind: unknown instance kind 'lm'; use one of llm, embedding, llm_embedding"
        in result.stderr
    )


def test_workers_share_the_port(env, config_file, llm_server):
    """Two gateway processes on one port (SO_REUSEPORT): connections spread over both, both serve."""
    port = free_port()
    started = cli(env, "start", "--config", str(config_file), "--port", str(port), "--workers", "2", "--background")
    assert started.returncode == 0, started.stderr
    try:
        pids = set()
        for _ in range(60):  # a fresh connection each time, so the kernel picks a worker each time
            pids.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2
        body = {"model": llm_server.model, "prompt": "Hi", "max_tokens": 2}
        for _ in range(4):
            assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        stopped = cli(env, "stop")
    assert stopped.returncode == 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"
