"""The real CPU backends: llama-server with Gemma 3 270M starts, serves, and stops without orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from sagesched.live import real_backends as rb

pytestmark = pytest.mark.backends


def test_llm_server_health_completion_and_metrics(llm_server: rb.RunningServer) -> None:
    assert httpx.get(f"{llm_server.url}/health", timeout=5).status_code == 200
    body = {"model": llm_server.model, "prompt": "The capital of France is", "max_tokens": 12, "ignore_eos": True}
    response = httpx.post(f"{llm_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["usage"]["completion_tokens"] == 12  # ignore_eos + max_tokens: exact length
    assert data["choices"][0]["text"].strip()
    metrics = httpx.get(f"{llm_server.url}/metrics", timeout=5).text
    assert "llamacpp:requests_processing" in metrics
    assert "llamacpp:tokens_predicted_total" in metrics
    models = httpx.get(f"{llm_server.url}/v1/models", timeout=5).json()
    assert any(m["id"] == rb.LLM_MODEL_NAME for m in models["data"])


def test_llm_server_streams_sse(llm_server: rb.RunningServer) -> None:
    body = {
        "model": llm_server.model,
        "prompt": "Once upon a time",
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
    }
    lines = []
    with httpx.stream("POST", f"{llm_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def test_embedding_server_returns_one_vector_per_input(embedding_server: rb.RunningServer) -> None:
    texts = ["a cat sat on the mat", "stock markets fell today", "a cat sat on the mat"]
    response = httpx.post(
        f"{embedding_server.url}/v1/embeddings", json={"model": embedding_server.model, "input": texts}, timeout=60
    )
    assert response.status_code == 200, response.text
    data = sorted(response.json()["data"], key=lambda d: d["index"])
    assert len(data) == 3
    vectors = [d["embedding"] for d in data]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) == 640  # Gemma 3 270M hidden size
    # Same text, same vector; different text, a different one.
    assert max(abs(a - b) for a, b in zip(vectors[0], vectors[2], strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(vectors[0], vectors[1], strict=True)) > 1e-3


def test_start_stop_leaves_no_process(start_llm_server) -> None:  # type: ignore[no-untyped-def]
    server = start_llm_server(parallel=1)
    pid = server.pid
    assert server.alive
    assert server.stop() is not None
    assert not server.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_command_line_start_status_stop(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "SAGESCHED_BACKENDS_DIR": str(tmp_path)}
    llm_port, emb_port = rb.free_port(), rb.free_port()
    cli = [sys.executable, "-m", "sagesched.live.real_backends"]
    start = subprocess.run(
        [*cli, "start", "--llm-port", str(llm_port), "--embedding-port", str(emb_port), "--parallel", "1", "--embedding-parallel", "1"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stderr
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    try:
        assert {r["role"] for r in records} == {"llm", "embedding"}
        status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and status.stdout.count("healthy") == 2, status.stdout
        assert httpx.get(f"http://127.0.0.1:{emb_port}/health", timeout=5).status_code == 200
    finally:
        stop = subprocess.run([*cli, "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.count("stopped") == 2
    for record in records:
        # `stop` waited for the exit; the orphaned process is reaped by init a moment later.
        deadline = time.monotonic() + 10
        while _pid_exists(record["pid"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(ProcessLookupError):
            os.kill(record["pid"], 0)
    assert not list(tmp_path.glob("*.json"))


def test_terminate_pid_escalates_to_sigkill() -> None:
    # A process that ignores SIGTERM must still be gone after the deadline.
    proc = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    started = time.monotonic()
    assert rb.terminate_pid(proc.pid, timeout_s=0.5)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_non_loopback_host_is_refused() -> None:
    with pytest.raises(ValueError, match="loopback"):
        rb.start_llama_server(host="0.0.0.0")


def test_missing_backend_message_names_install_step(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(rb, "_import_or_none", lambda module: None)
    with pytest.raises(rb.BackendNotInstalled, match=r"real_backends install"):
        rb.llama_server_binary()
    with pytest.raises(rb.BackendNotInstalled, match=r"real_backends install"):
        rb.model_path()
