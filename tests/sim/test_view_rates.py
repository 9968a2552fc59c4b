"""`SimConfig.view_rates`: the rates a simulated policy sees, nominal or learned as the live executor learns.

"learned" must feed each finished request to its instance's `ThroughputEstimate` once, in the
order the requests finish, with the times a client would have seen: then a simulated policy is
handed the estimates the live gateway would have handed it on the same run.
"""

from __future__ import annotations

import pandas as pd
import pytest

from sagesched.core import Request, RequestRecord, RequestType
from sagesched.core.rates import ThroughputEstimate
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, simulate
from sagesched.sim.config import ConfigFieldError
from sagesched.sim.perf_model import LLMPerfModel

PERF = LLMPerfModel.load("llama-2-7b", "a100")
CLUSTER = ClusterConfig(
    (
        InstanceConfig(id="llm", model="llama-2-7b", hardware="a100"),
        InstanceConfig(id="emb", kind="embedding", model=None, embedding_model="bge-base", hardware="a100"),
    )
)


class _Watching(FifoPolicy):
    """FIFO that notes, at every call, the rates each view carries."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, dict[str, tuple[float, float, float]]]] = []

    def schedule(self, now, queue, instances):
        rates = {v.id: (v.prefill_tokens_per_s, v.decode_step_s, v.embedding_tokens_per_s) for v in instances}
        self.seen.append((now, rates))
        return super().schedule(now, queue, instances)


def _spaced_workload() -> list[Request]:
    """Chats and embeddings one at a time (each done before the next arrives): no two finish together."""
    out = []
    for i in range(10):
        out.append(
            Request(
                f"c{i}",
                RequestType.LLM_CHAT,
                "llama-2-7b",
                2.0 * i,
                prompt_tokens=300 + 90 * i,
                max_tokens=40,
                output_tokens=20 + 3 * i,
            )
        )
        out.append(
            Request(
                f"e{i}",
                RequestType.EMBEDDING,
                "bge-base",
                2.0 * i + 1.0,
                prompt_tokens=50 + 40 * i,
                embedding_inputs=1,
                embedding_tokens=50 + 40 * i,
            )
        )
    return out


def _burst(n: int, prompt: int, output: int, late_at: float) -> list[Request]:
    """`n` chats 1 ms apart (b0, b1, ...), then one short chat ("late") on the idle instance at `late_at`."""
    chats = [
        Request(
            f"b{i}",
            RequestType.LLM_CHAT,
            "llama-2-7b",
            0.001 * i,
            prompt_tokens=prompt,
            max_tokens=output,
            output_tokens=output,
        )
        for i in range(n)
    ]
    late = Request(
        "late", RequestType.LLM_CHAT, "llama-2-7b", late_at, prompt_tokens=100, max_tokens=5, output_tokens=5
    )
    return [*chats, late]


def _run(view_rates: str, requests: list[Request]) -> tuple[_Watching, object]:
    policy = _Watching()
    result = simulate(requests, CLUSTER, policy, SimConfig(view_rates=view_rates, timeline_interval_s=0.0))
    return policy, result


def test_nominal_rates_never_move():
    policy, _ = _run("nominal", _spaced_workload())
    assert {rates["llm"] for _, rates in policy.seen} == {
        (PERF.prefill_tokens_per_s, PERF.decode_step_s, PERF.prefill_tokens_per_s)
    }


def test_learned_rates_are_what_the_live_estimator_makes_of_the_finished_records():
    policy, result = _run("learned", _spaced_workload())
    records = result.records
    assert (records.outcome == "completed").all()
    start = {inst: rates for inst, rates in policy.seen[0][1].items()}
    for now, seen in policy.seen[1:]:
        for inst, rates in seen.items():
            expected = ThroughputEstimate(*start[inst])
            done = records[(records.instance_id == inst) & (records.finish_s <= now)].sort_values("finish_s")
            for row in done.itertuples():
                rec = RequestRecord(
                    **{f: getattr(row, f) for f in ("request_id", "type", "model", "priority", "tenant", "arrival_s")}
                )
                rec.prompt_tokens, rec.embedding_tokens, rec.batch_size = (
                    row.prompt_tokens,
                    row.embedding_tokens,
                    row.batch_size,
                )
                rec.dispatch_s, rec.first_token_s = row.dispatch_s, row.first_token_s
                expected.learn(rec, row.finish_s, row.output_tokens, 0.2)
            assert rates == pytest.approx(expected.as_tuple(), rel=1e-12), (now, inst)
    final = policy.seen[-1][1]
    # Both kinds of rate moved off the engine models' figures.
    assert final["llm"][1] != start["llm"][1]
    assert final["emb"][2] != start["emb"][2]


def test_learned_decode_step_rises_when_the_batch_grows():
    """Forty chats at once: every step carries forty sequences, so each one's step is longer than
    the nominal single-sequence step, and the learned figure says so."""
    burst = _burst(40, prompt=500, output=60, late_at=30.0)
    learned, _ = _run("learned", burst)
    nominal, _ = _run("nominal", burst)
    assert learned.seen[-1][1]["llm"][1] > 1.5 * nominal.seen[-1][1]["llm"][1]


def test_only_a_request_that_started_clear_teaches_the_prefill_rate():
    """A burst: the first chat finds the instance idle, every later one a prompt ahead of it. Their
    times to first token include that wait, which a policy adds separately, so only the first one
    (and a later chat on an idle instance) moves the prefill rate; every one moves the decode step."""
    burst = _burst(20, prompt=2000, output=30, late_at=60.0)
    policy, result = _run("learned", burst)
    records = result.records.set_index("request_id")
    nominal = PERF.prefill_tokens_per_s
    first = records.loc["b0"]
    expected = nominal + 0.2 * (first.prompt_tokens / (first.first_token_s - first.dispatch_s) - nominal)
    at_late = next(rates["llm"] for now, rates in policy.seen if now == 60.0)
    assert at_late[0] == pytest.approx(expected, rel=1e-12)
    # Had every chat taught it, the waits would have pulled it far lower.
    waited = records.loc[[f"b{i}" for i in range(1, 20)]]
    assert (waited.prompt_tokens / (waited.first_token_s - waited.dispatch_s)).max() < 0.5 * expected
    assert at_late[1] != PERF.decode_step_s


def test_learned_rates_give_the_same_records_in_jump_and_step_mode():
    """The rates move at completions, which the decode jump reproduces exactly, so the reference
    mode and the fast one still agree request by request."""
    requests = [*_burst(12, prompt=700, output=40, late_at=5.0), *_spaced_workload()[:6]]
    records = {}
    for mode in ("jump", "step"):
        result = simulate(
            requests, CLUSTER, _Watching(), SimConfig(mode=mode, view_rates="learned", timeline_interval_s=0.0)
        )
        records[mode] = result.records.sort_values("request_id").reset_index(drop=True)
    cols = ["request_id", "instance_id", "dispatch_s", "first_token_s", "finish_s", "outcome"]
    pd.testing.assert_frame_equal(records["jump"][cols], records["step"][cols], rtol=1e-9)


def test_learned_rates_keep_the_simulator_deterministic():
    requests = _spaced_workload()
    _, a = _run("learned", requests)
    _, b = _run("learned", requests)
    assert a.records.equals(b.records)


@pytest.mark.parametrize(("field", "value"), [("view_rates", "measured"), ("rate_smoothing", 0.0)])
def test_bad_view_rate_settings_name_the_field(field, value):
    with pytest.raises(ConfigFieldError, match=field):
        SimConfig.from_dict({field: value})
