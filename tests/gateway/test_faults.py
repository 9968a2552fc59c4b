"""A backend killed and restarted during a load run: no accepted request that had not started
streaming is lost, and the restarted backend is taken back into service."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

pytestmark = [pytest.mark.backends, pytest.mark.slow]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    """Poll `predicate` until true; fail naming `what` after `timeout_s` (generous: a loaded 2-core CPU)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} (waited {timeout_s:g}s)"
        time.sleep(0.05)


def test_kill_and_restart_backend_under_load(start_gateway, start_llm_server):
    # One CPU thread each: two servers of two ggml threads (which spin at barriers) oversubscribe a
    # 2-core machine, and on a loaded one a 12-token request then took tens of seconds.
    a = start_llm_server(parallel=2, threads=1)
    b = start_llm_server(parallel=2, threads=1)
    gw = start_gateway(
        [
            {"url": a.url, "kind": "llm", "models": [a.model], "id": "a"},
            {"url": b.url, "kind": "llm", "models": [b.model], "id": "b"},
        ],
        # A busy llama-server on a loaded CPU can take seconds to answer /health; a probe that times
        # out marks a live backend unhealthy, which is not what this test is about.
        executor={"health_interval_s": 0.5, "probe_timeout_s": 10.0},
    )
    executor = gw.gateway.executor

    def backend(bid: str) -> dict:
        return executor.snapshot()["backends"][bid]

    body = {"model": a.model, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}
    stop = threading.Event()
    results: list[httpx.Response] = []

    def worker():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                results.append(client.post(f"{gw.url}/v1/completions", json=body))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(worker) for _ in range(6)]
        try:
            # Conditions, not fixed sleeps: the load is running on both backends, b holds requests
            # that have not started streaming (the kill must cut some off), then the kill.
            wait_for(lambda: len(results) >= 2 and backend("b")["inflight"] >= 1, 60, "no load reached backend b")
            b.kill()  # SIGKILL: in-flight non-streaming requests at b lose their connection
            killed_at = len(results)
            wait_for(lambda: not backend("b")["healthy"], 30, "the gateway never noticed that b died")
            restarted = start_llm_server(parallel=2, threads=1, port=b.port)
            wait_for(lambda: backend("b")["healthy"], 60, "the restarted backend was not taken back into service")
            completed_before = backend("b")["completed"]
            # Service went on (more requests answered after the kill) and the restarted b serves again.
            wait_for(
                lambda: len(results) > killed_at + 6 and backend("b")["completed"] > completed_before,
                90,
                "the restarted backend got no traffic, or the pool stopped answering",
            )
        finally:
            stop.set()
            for f in futures:
                f.result()
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == len(statuses), [r.text for r in results if r.status_code != 200][:3]
    assert len(results) > killed_at + 6
    snapshot = executor.snapshot()
    assert snapshot["backends"]["b"]["healthy"] and restarted.alive
    assert snapshot["backends"]["b"]["completed"] > completed_before, "the restarted backend got no traffic"
    assert snapshot["retries"] >= 1  # requests cut off at b were re-queued, not failed
    ready = httpx.get(f"{gw.url}/ready").json()
    assert {x["id"]: x["healthy"] for x in ready["backends"]} == {"a": True, "b": True}


def test_backend_dying_mid_stream_is_an_sse_error_event(start_gateway, start_llm_server):
    doomed = start_llm_server(parallel=1)
    gw = start_gateway([{"url": doomed.url, "kind": "llm", "models": [doomed.model]}])
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(
        model=doomed.model, prompt="Once", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:
                doomed.kill()
    assert len(chunks) >= 2
    assert "not retried" in info.value.message or "failed" in info.value.message
    # Not retried: exactly one record, failed, after streaming started.
    records = gw.gateway.executor.records
    assert len(records) == 1 and records[0].outcome == "failed" and records[0].first_token_s is not None
