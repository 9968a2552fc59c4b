"""The live executor against real llama-server backends: dispatch, batching, spreading, faults, errors."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence

import httpx
import numpy as np
import pytest

from sagesched.core import Assignment, Decision, InstanceView, RejectCode, Rejection, Request
from sagesched.core.rates import ThroughputEstimate
from sagesched.live.backend_metrics import metrics_from_text
from sagesched.live.backends import BackendClient, BackendConfig
from sagesched.live.errors import (
    ModelNotFound,
    NoBackendAvailable,
    QueueFull,
    RequestRejected,
    ServiceStopping,
    UpstreamError,
    UpstreamTimeout,
)
from sagesched.live.executor import ExecutorConfig, LiveExecutor, records_frame
from sagesched.live.real_backends import free_port
from sagesched.policies import make_policy
from sagesched.policies.base import LoadLedger, Policy
from sagesched.policies.fifo import FifoPolicy

pytestmark = pytest.mark.anyio

FAST = ExecutorConfig(health_interval_s=0.2, request_timeout_s=60.0, connect_timeout_s=1.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class HoldAll(Policy):
    """Never places anything (requests wait in the gateway queue)."""

    name = "test-hold"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        return []


class RejectAll(Policy):
    name = "test-reject"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        return [Rejection(r.id, "tenant over budget", RejectCode.SLO_UNATTAINABLE, "test-reject/budget") for r in queue]


class Primary(Policy):
    """Everything to the first healthy compatible instance with a free slot, in view order."""

    name = "test-primary"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        ledger = LoadLedger(instances)
        out: list[Decision] = []
        for request in sorted(queue, key=lambda r: r.arrival_s):
            candidates = [v for v in instances if v.healthy and v.can_serve(request)]
            if candidates and ledger.free_slots(candidates[0].id) > 0:
                out.append(ledger.assign(candidates[0], [request], "test-primary"))
        return out


class WakeAt(Policy):
    """Holds everything until t=`at`, asking to be woken then."""

    name = "test-wake"

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        if now < self.at:
            return []
        view = next(v for v in instances if v.healthy)
        return [Assignment(view.id, (r.id,), rule="test-wake") for r in queue]

    def next_wakeup(self, now: float) -> float | None:
        return self.at if now < self.at else None


def llm(server, **kw) -> BackendConfig:
    return BackendConfig(server.url, "llm", [server.model], **kw)


def completion(server, prompt: str = "The sky is", max_tokens: int = 3, **kw) -> dict:
    return {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


async def test_completion_chat_stream_and_records(llm_server) -> None:
    async with LiveExecutor(FifoPolicy(), [llm(llm_server)], FAST) as ex:
        resp = await ex.submit(None, completion(llm_server), "completions")
        assert resp.json["choices"][0]["text"]
        assert resp.instance_id == llm_server.url.removeprefix("http://")

        body = {
            "model": llm_server.model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "stream": True,
        }
        resp = await ex.submit(None, body, "chat")
        chunks = [c async for c in resp.stream]
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
        assert not any("usage" in c for c in chunks), "usage was not asked for, so it must not be passed through"

        body["stream_options"] = {"include_usage": True}
        resp = await ex.submit(None, body, "chat")
        chunks = [c async for c in resp.stream]
        assert chunks[-1].get("usage", {}).get("completion_tokens", 0) >= 1

        frame = records_frame(ex)
        assert len(frame) == 3 and set(frame.outcome) == {"completed"}
        streamed = [r for r in ex.records if r.type == "llm_chat"]
        for r in streamed:
            # TTFT at the first chunk with content, never before dispatch, never after the end.
            assert r.dispatch_s <= r.first_token_s <= r.finish_s
            assert r.output_tokens >= 1
        snap = ex.snapshot()
        assert snap["decisions"] == {"fifo": 3} and snap["queue_len"] == 0 and snap["inflight"] == 0
        backend = next(iter(snap["backends"].values()))
        assert backend["healthy"] and backend["metrics"] is not None and backend["age_s"] is not None


async def test_backend_rates_are_what_the_shared_estimator_makes_of_the_finished_records(llm_server) -> None:
    """The live half of `sim.view_rates=learned` (tests/sim/test_view_rates.py): a backend's view
    rates are `ThroughputEstimate` folded over its finished records, from the configured figures."""
    cfg = llm(llm_server, prefill_tokens_per_s=1e6, decode_step_s=1e-6)
    async with LiveExecutor(FifoPolicy(), [cfg], FAST) as ex:
        for i in range(3):
            prompt = f"List the numbers from {i} to {i + 40}, one per line, with no other words:"
            resp = await ex.submit(
                None, completion(llm_server, prompt, max_tokens=6, ignore_eos=True, stream=True), "completions"
            )
            assert [c async for c in resp.stream]
        expected = ThroughputEstimate(cfg.prefill_tokens_per_s, cfg.decode_step_s, cfg.embedding_tokens_per_s)
        for record in sorted(ex.records, key=lambda r: r.finish_s):
            assert record.output_tokens >= 2 and record.prompt_tokens >= 16
            expected.learn(record, record.finish_s, record.output_tokens, FAST.rate_smoothing)
        view = next(iter(ex.snapshot()["backends"].values()))
        seen = (view["prefill_tokens_per_s"], view["decode_step_s"])
        assert seen == pytest.approx(expected.as_tuple()[:2], rel=1e-2)
        assert seen[0] < 1e6 and seen[1] > 1e-6  # moved off the (absurd) configured figures


async def test_a_chat_dispatched_behind_another_does_not_teach_the_prefill_rate(llm_server) -> None:
    """Two chats at once on a backend declared one sequence wide: the second is dispatched with the
    first ahead of it, so its time to first token (which includes that wait) leaves the prefill
    rate alone; both teach the decode step."""
    cfg = llm(llm_server, max_num_seqs=1, prefill_tokens_per_s=1e6, decode_step_s=1e-6)
    async with LiveExecutor(FifoPolicy(), [cfg], FAST) as ex:

        async def chat(i: int) -> None:
            prompt = f"Write the numbers from {i} to {i + 30} in words, separated by commas:"
            body = completion(llm_server, prompt, max_tokens=6, ignore_eos=True, stream=True)
            resp = await ex.submit(None, body, "completions")
            assert [c async for c in resp.stream]

        await asyncio.gather(chat(1), chat(2))
        records = sorted(ex.records, key=lambda r: r.finish_s)
        first_dispatched = min(records, key=lambda r: r.dispatch_s)
        expected = ThroughputEstimate(cfg.prefill_tokens_per_s, cfg.decode_step_s, cfg.embedding_tokens_per_s)
        for record in records:
            clear = record is first_dispatched
            expected.learn(record, record.finish_s, record.output_tokens, FAST.rate_smoothing, started_clear=clear)
        view = next(iter(ex.snapshot()["backends"].values()))
        assert (view["prefill_tokens_per_s"], view["decode_step_s"]) == pytest.approx(expected.as_tuple()[:2], rel=1e-2)


async def test_merged_embedding_batch_returns_each_caller_its_own_vectors(embedding_server) -> None:
    texts = [["red apple"], ["a train leaves the station", "blue sky"], ["quantum"]]
    cfg = BackendConfig(embedding_server.url, "embedding", [embedding_server.model])
    # Reference: each caller alone, straight to the backend.
    ref_client = BackendClient(cfg)
    try:
        reference = [(await ref_client.embed(embedding_server.model, t))[0] for t in texts]
    finally:
        await ref_client.aclose()

    policy = make_policy("hybrid", min_embedding_batch_size=3, max_embedding_wait_ms=5000.0)
    async with LiveExecutor(policy, [cfg], FAST) as ex:
        calls: list[int] = []
        backend = ex._backends[cfg.id].client
        real_embed = backend.embed

        async def counting_embed(model, inputs, extra=None):
            calls.append(len(inputs))
            return await real_embed(model, inputs, extra)

        backend.embed = counting_embed  # a spy: the real call still happens
        formats = ["float", "base64", "float"]
        results = await asyncio.gather(
            *(
                ex.submit(None, {"model": embedding_server.model, "input": t, "encoding_format": f}, "embeddings")
                for t, f in zip(texts, formats, strict=True)
            )
        )
        assert calls == [4], "three callers, four inputs, ONE backend call"
        for resp, ref, fmt in zip(results, reference, formats, strict=True):
            data = resp.json["data"]
            assert [d["index"] for d in data] == list(range(len(ref)))
            got = [
                np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist() if fmt == "base64" else d["embedding"]
                for d in data
            ]
            assert np.allclose(np.array(got), np.array(ref), atol=1e-3)
        assert {r.batch_size for r in ex.records} == {3}
        assert len({r.dispatch_s for r in ex.records}) == 1


async def test_two_llama_servers_share_the_load(llm_server, start_llm_server) -> None:
    second = start_llm_server(parallel=2)
    backends = [llm(llm_server, id="a", max_num_seqs=4), llm(second, id="b", max_num_seqs=2)]

    async def predicted(http: httpx.AsyncClient) -> dict[str, float]:
        # A counter, not the `requests_processing` gauge: a poller can miss a short request on a
        # gauge, never on a counter of tokens generated.
        out = {}
        for bid, server in (("a", llm_server), ("b", second)):
            raw = metrics_from_text((await http.get(f"{server.url}/metrics")).text).raw
            out[bid] = raw.get("llamacpp:tokens_predicted_total", 0.0)
        return out

    async with LiveExecutor(make_policy("least_loaded"), backends, FAST) as ex, httpx.AsyncClient(timeout=30) as http:
        before = await predicted(http)
        bodies = [completion(llm_server, f"Count to ten: {i},", max_tokens=6, ignore_eos=True) for i in range(4)]
        results = await asyncio.gather(*(ex.submit(None, b, "completions") for b in bodies))
        after = await predicted(http)
    used = {r.instance_id for r in results}
    assert used == {"a", "b"}, f"the policy should spread 4 requests over both servers, used {used}"
    work = {bid: after[bid] - before[bid] for bid in before}
    assert work["a"] >= 6 and work["b"] >= 6, f"both servers' /metrics must show work (tokens generated): {work}"


async def test_killed_backend_requeues_unstarted_and_fails_streaming_clearly(llm_server, start_llm_server) -> None:
    doomed = start_llm_server(parallel=1)
    backends = [llm(doomed, id="doomed", max_inflight=2), llm(llm_server, id="survivor")]
    async with LiveExecutor(Primary(), backends, FAST) as ex:
        streaming = await ex.submit(
            None, completion(doomed, "Write a long story:", max_tokens=200, ignore_eos=True, stream=True), "completions"
        )
        assert streaming.instance_id == "doomed"
        chunks = streaming.stream.__aiter__()
        first = await chunks.__anext__()
        assert first
        # Not started: waits inside the doomed server (one slot) and in the gateway queue (max_inflight=2).
        waiting = asyncio.create_task(ex.submit(None, completion(doomed, "Hello", max_tokens=2), "completions"))
        queued = asyncio.create_task(ex.submit(None, completion(doomed, "Bye", max_tokens=2), "completions"))
        deadline = time.monotonic() + 30
        while ex.snapshot()["queue_len"] != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert ex.snapshot()["backends"]["doomed"]["inflight"] == 2 and ex.snapshot()["queue_len"] == 1
        doomed.process.kill()
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="after the stream started"):
            async for _ in chunks:
                pass
        assert time.monotonic() - started < 10, "the streaming caller must learn of the failure promptly"
        done = await asyncio.wait_for(asyncio.gather(waiting, queued), timeout=60)
        assert {r.instance_id for r in done} == {"survivor"}
        assert all(r.json["choices"][0]["text"] is not None for r in done)
        snap = ex.snapshot()
        assert snap["backends"]["doomed"]["healthy"] is False and snap["retries"] >= 1
        outcomes = sorted(r.outcome for r in ex.records)
        assert outcomes == ["completed", "completed", "failed"]


async def test_queue_full_timeout_rejection_and_unknown_model(llm_server) -> None:
    cfg = ExecutorConfig(max_queue=1, request_timeout_s=0.5, health_interval_s=0.2)
    async with LiveExecutor(HoldAll(), [llm(llm_server)], cfg) as ex:
        first = asyncio.create_task(ex.submit(None, completion(llm_server), "completions"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as full:
            await ex.submit(None, completion(llm_server), "completions")
        assert full.value.status == 429 and full.value.headers()["Retry-After"] == "1"
        with pytest.raises(UpstreamTimeout) as timeout:
            await first
        assert timeout.value.status == 504 and "queued" in timeout.value.message
        with pytest.raises(ModelNotFound, match=llm_server.model):
            await ex.submit(None, {"model": "nope", "prompt": "x"}, "completions")
        with pytest.raises(ModelNotFound):  # an LLM-only pool serves no embeddings
            await ex.submit(None, {"model": llm_server.model, "input": "x"}, "embeddings")
        assert sorted(r.outcome for r in ex.records) == ["failed", "rejected", "rejected", "rejected"]

    async with LiveExecutor(RejectAll(), [llm(llm_server)], FAST) as ex:
        with pytest.raises(RequestRejected, match="tenant over budget") as rejected:
            await ex.submit(None, completion(llm_server), "completions")
        assert rejected.value.code == RejectCode.SLO_UNATTAINABLE and rejected.value.status == 503
        assert ex.snapshot()["rejections"] == {RejectCode.SLO_UNATTAINABLE: 1}
        assert ex.records[0].reason.startswith("slo_unattainable: tenant over budget")


async def test_no_healthy_backend_fails_after_grace() -> None:
    dead = BackendConfig(f"http://127.0.0.1:{free_port()}", "llm", ["m"])
    cfg = ExecutorConfig(no_backend_grace_s=0.3, health_interval_s=0.1, connect_timeout_s=0.3)
    async with LiveExecutor(FifoPolicy(), [dead], cfg) as ex:
        started = time.monotonic()
        with pytest.raises(NoBackendAvailable, match="no healthy backend"):
            await ex.submit(None, {"model": "m", "prompt": "x", "max_tokens": 1}, "completions")
        assert 0.25 < time.monotonic() - started < 5


async def test_set_policy_and_wakeup_and_stop(llm_server) -> None:
    async with LiveExecutor(HoldAll(), [llm(llm_server)], FAST) as ex:
        task = asyncio.create_task(ex.submit(None, completion(llm_server, max_tokens=1), "completions"))
        await asyncio.sleep(0.1)
        assert ex.snapshot()["queue_len"] == 1
        ex.set_policy(FifoPolicy())
        assert (await task).json["choices"]
        at = ex.now() + 0.3
        ex.set_policy(WakeAt(at))
        resp = await ex.submit(None, completion(llm_server, max_tokens=1), "completions")
        assert resp.json and ex.records[-1].dispatch_s >= at
        ex.set_policy(HoldAll())
        held = asyncio.create_task(ex.submit(None, completion(llm_server), "completions"))
        await asyncio.sleep(0.05)
        await ex.stop(drain_timeout_s=0.1)
        with pytest.raises(ServiceStopping):
            await held
        with pytest.raises(ServiceStopping):
            await ex.submit(None, completion(llm_server), "completions")


async def test_same_policy_and_config_in_simulator_and_live(llm_server, embedding_server) -> None:
    """One policy class and config, two drivers: the same decisions, records in one schema."""
    from sagesched.core import RECORD_COLUMNS, RequestType
    from sagesched.sim import ClusterConfig, SimConfig, simulate

    config = {"min_embedding_batch_size": 3, "max_embedding_wait_ms": 5000.0}
    # Simulated twins of the live pool: the LLM is the same model, the encoder a profiled one.
    sim_models = {"llm": "gemma-3-270m", "emb": "bge-base"}
    live_models = {"llm": llm_server.model, "emb": embedding_server.model}

    def workload(models: dict[str, str]) -> list[Request]:
        reqs = [
            Request(
                f"l{i}", RequestType.LLM_GENERATE, models["llm"], 0.0, prompt_tokens=4, max_tokens=2, output_tokens=2
            )
            for i in range(2)
        ]
        reqs += [
            Request(
                f"e{i}",
                RequestType.EMBEDDING,
                models["emb"],
                0.0,
                prompt_tokens=2,
                embedding_inputs=1,
                embedding_tokens=2,
            )
            for i in range(3)
        ]
        return reqs

    cluster = ClusterConfig.from_dict(
        {
            "instances": [
                {"id": "llm", "kind": "llm", "model": sim_models["llm"]},
                {"id": "emb", "kind": "embedding", "model": None, "embedding_model": sim_models["emb"]},
            ]
        }
    )
    simulated = simulate(workload(sim_models), cluster, make_policy("hybrid", **config), SimConfig()).records

    backends = [
        llm(llm_server, id="llm"),
        BackendConfig(embedding_server.url, "embedding", [embedding_server.model], id="emb"),
    ]
    async with LiveExecutor(make_policy("hybrid", **config), backends, FAST) as ex:
        bodies = {
            "l": lambda: ({"model": live_models["llm"], "prompt": "Hi", "max_tokens": 2}, "completions"),
            "e": lambda: ({"model": live_models["emb"], "input": "hello"}, "embeddings"),
        }
        submits = []
        for r in workload(live_models):
            body, endpoint = bodies[r.id[0]]()
            submits.append(ex.submit(Request(**{**_fields(r), "arrival_s": ex.now()}), body, endpoint))
        await asyncio.gather(*submits)
        live = records_frame(ex)

    assert list(live.columns) == list(simulated.columns) == list(RECORD_COLUMNS)
    for frame in (simulated, live):
        frame = frame.set_index("request_id").sort_index()
        assert set(frame.outcome) == {"completed"}
        assert set(frame.loc[["l0", "l1"], "instance_id"]) == {"llm"}
        assert set(frame.loc[["e0", "e1", "e2"], "instance_id"]) == {"emb"}
        assert set(frame.loc[["e0", "e1", "e2"], "batch_size"]) == {3}, "hybrid merged the three embeddings in both"
        assert all(rule.startswith("hybrid/") for rule in frame.rule)


def _fields(request: Request) -> dict:
    import dataclasses

    return {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
