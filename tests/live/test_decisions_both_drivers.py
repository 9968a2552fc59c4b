"""One meaning for a policy's decisions in both drivers: the same misbehaving policy, run in the
simulator and live over the same requests, ends the same requests the same way (the decision core)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sagesched.core import Assignment, InstanceView, Request, RequestType
from sagesched.live.backends import BackendConfig
from sagesched.live.errors import LiveError
from sagesched.live.executor import ExecutorConfig, LiveExecutor
from sagesched.policies.base import Policy
from sagesched.sim import ClusterConfig, SimConfig, simulate
from tests.gateway.fake_backend import FakeBackend, chat_json, json_response
from tests.sim.tiny_perf import make_provider

pytestmark = pytest.mark.anyio
MODEL = "llama-2-7b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Misbehaving(Policy):
    """Raises on tenant 'poison', places tenant 'astray' on an instance that does not exist,
    returns garbage alongside tenant 'junk', places everything else on the first instance."""

    name = "misbehaving"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]):
        if any(r.tenant == "poison" for r in queue):
            raise OverflowError("int too large to convert to float")
        out: list = []
        for r in queue:
            if r.tenant == "junk":
                out.append("not a decision")
            out.append(Assignment("nowhere" if r.tenant == "astray" else instances[0].id, (r.id,)))
        return out


TENANTS = ["t", "poison", "t", "astray", "t", "junk", "t", "t"]


def requests() -> list[Request]:
    return [
        Request(f"r{i}", RequestType.LLM_CHAT, MODEL, 0.01 * i, prompt_tokens=8, max_tokens=4, tenant=tenant)
        for i, tenant in enumerate(TENANTS)
    ]


def expected() -> dict[str, tuple[str, str]]:
    codes = {"poison": "policy_error", "astray": "invalid_decision", "junk": "policy_error"}
    return {f"r{i}": ("failed", codes[t]) if t in codes else ("completed", "") for i, t in enumerate(TENANTS)}


def outcome(record_outcome: str, reason: str) -> tuple[str, str]:
    return record_outcome, reason.split(":", 1)[0] if record_outcome != "completed" else ""


def test_simulator() -> None:
    cluster = ClusterConfig.from_dict({"instances": [{"id": "llm", "kind": "llm", "model": MODEL}]})
    result = simulate(requests(), cluster, Misbehaving(), SimConfig(), perf_provider=make_provider(kv_tokens=20_000))
    got = {row.request_id: outcome(row.outcome, row.reason) for row in result.records.itertuples()}
    assert got == expected()


async def test_live() -> None:
    async def handler(path, body):
        return json_response(chat_json("ok"))

    fb = FakeBackend(handler).start()
    try:
        cfg = ExecutorConfig(health_interval_s=0.2, request_timeout_s=30.0)
        async with LiveExecutor(Misbehaving(), [BackendConfig(fb.url, "llm", [MODEL], id="llm")], cfg) as ex:
            reqs = requests()

            async def one(r: Request):
                await asyncio.sleep(r.arrival_s)
                body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                return await ex.submit(r, body, "chat")

            results = await asyncio.gather(*(one(r) for r in reqs), return_exceptions=True)
        got = {rec.request_id: outcome(rec.outcome, rec.reason) for rec in ex.records}
    finally:
        fb.stop()
    assert got == expected()
    for r, res in zip(reqs, results, strict=True):
        if expected()[r.id][0] == "failed":
            assert isinstance(res, LiveError) and res.code == expected()[r.id][1]
