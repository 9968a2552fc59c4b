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


def test_kill_and_restart_backend_under_load(start_gateway, start_llm_server):
    a = start_llm_server(parallel=2)
    b = start_llm_server(parallel=2)
    gw = start_gateway(
        [
            {"url": a.url, "kind": "llm", "models": [a.model], "id": "a"},
            {"url": b.url, "kind": "llm", "models": [b.model], "id": "b"},
        ],
        executor={"health_interval_s": 0.5},
    )
    body = {"model": a.model, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}
    stop = threading.Event()
    results: list[httpx.Response] = []

    def worker():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                results.append(client.post(f"{gw.url}/v1/completions", json=body))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(worker) for _ in range(6)]
        time.sleep(2.0)
        b.kill()  # SIGKILL: in-flight non-streaming requests at b lose their connection
        killed_at = len(results)
        time.sleep(2.0)
        restarted = start_llm_server(parallel=2, port=b.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not gw.gateway.executor.snapshot()["backends"]["b"]["healthy"]:
            time.sleep(0.1)
        completed_before = gw.gateway.executor.snapshot()["backends"]["b"]["completed"]
        time.sleep(3.0)
        stop.set()
        for f in futures:
            f.result()
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == len(statuses), [r.text for r in results if r.status_code != 200][:3]
    assert len(results) > killed_at + 6
    snapshot = gw.gateway.executor.snapshot()
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
