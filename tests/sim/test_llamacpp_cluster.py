"""llama-server instances in the cluster simulator (`engine: llamacpp`).

The reference is the single-server driver `replay_llamacpp`: a cluster of one llama.cpp instance under
FIFO, with room for every request, must give it the same per-request times. Then two instances under
fifo and hybrid (conservation, jump == step), a llama-server embedding instance, 503s, views, and
config errors.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from sagesched.core import Request, RequestType
from sagesched.policies import make_policy
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, SimConfig, simulate
from sagesched.sim.engines.llamacpp_driver import replay_llamacpp
from sagesched.sim.engines.llamacpp_instance import engine_config, load_llamacpp_perf
from sagesched.sim.engines.llamacpp_perf import load_llamacpp_calibration
from sagesched.sim.engines.types import EngineRequest
from sagesched.typed_config import ConfigFieldError

LLM_CAL = "gemma-3-270m-q4km-xeon-2cpu-t1"
EMB_CAL = "gemma-3-270m-q4km-xeon-2cpu-t1-embedding"


def llm_entry(ident: str = "cpu", count: int | None = None, **knobs) -> dict:
    entry = {
        "id": ident,
        "kind": "llm",
        "model": "gemma-3-270m",
        "engine": "llamacpp",
        "max_inflight": 1000,
        "llamacpp": {"calibration": LLM_CAL, "n_parallel": 2, **knobs},
    }
    if count is not None:
        entry["count"] = count
    return entry


def emb_entry(**knobs) -> dict:
    return {
        "id": "emb",
        "kind": "embedding",
        "model": None,
        "embedding_model": "gemma-embed",
        "engine": "llamacpp",
        "max_inflight": 1000,
        "llamacpp": {"calibration": EMB_CAL, "n_parallel": 1, **knobs},
    }


def chats(n: int, rate: float, seed: int = 3, start: float = 0.0) -> list[Request]:
    rng = random.Random(seed)
    t = start
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(
            Request(
                id=f"c{i:03d}",
                type=RequestType.LLM_CHAT,
                model="gemma-3-270m",
                arrival_s=round(t, 6),
                prompt_tokens=rng.randint(8, 200),
                max_tokens=32,
                output_tokens=rng.randint(2, 24),
            )
        )
    return out


def embeds(n: int, rate: float, seed: int = 5) -> list[Request]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        k = rng.randint(1, 4)
        tokens = rng.randint(48, 192)
        out.append(
            Request(
                id=f"e{i:03d}",
                type=RequestType.EMBEDDING,
                model="gemma-embed",
                arrival_s=round(t, 6),
                prompt_tokens=tokens,
                embedding_inputs=k,
                embedding_tokens=tokens,
            )
        )
    return out


def run(requests, instances, policy=None, mode="jump"):
    cluster = ClusterConfig.from_dict({"instances": instances})
    return simulate(requests, cluster, policy or FifoPolicy(), SimConfig(mode=mode, timeline_interval_s=0.5))


def by_id(result):
    return result.records.set_index("request_id")


@pytest.mark.parametrize("rate", [0.5, 3.0])
def test_one_instance_equals_the_single_server_driver(rate):
    """Light load and past the two slots' capacity: every request's first token and finish agree."""
    reqs = chats(60, rate)
    cal = load_llamacpp_calibration(LLM_CAL)
    entry = llm_entry()
    cfg = engine_config(ClusterConfig.from_dict({"instances": [entry]}).instances[0].llamacpp, False, cal)
    ref = replay_llamacpp(
        [
            (
                r.arrival_s,
                EngineRequest(
                    id=r.id, prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens or 1, max_tokens=r.max_tokens
                ),
            )
            for r in reqs
        ],
        cfg,
        cal.step,
        frontend_request_s=cal.frontend_request_s,
    )
    for mode in ("jump", "step"):
        got = by_id(run(reqs, [entry], mode=mode))
        assert (got["outcome"] == "completed").all()
        for rec in ref:
            row = got.loc[rec.id]
            assert row["first_token_s"] == pytest.approx(rec.first_token_s, rel=1e-9, abs=1e-9)
            assert row["finish_s"] == pytest.approx(rec.finish_s, rel=1e-9, abs=1e-9)
    # The load matters: past capacity the requests queue behind the two slots.
    e2e = [r.e2e_s for r in ref if r.e2e_s is not None]
    assert (max(e2e) > 5.0) == (rate > 1.0)


def test_simultaneous_arrivals_share_the_first_step_as_in_the_driver():
    """Three requests at one instant on an idle server: one batch, as llama-server's task loop takes them."""
    reqs = [
        Request(
            id=f"s{i}",
            type=RequestType.LLM_CHAT,
            model="gemma-3-270m",
            arrival_s=1.0,
            prompt_tokens=40,
            max_tokens=4,
            output_tokens=4,
        )
        for i in range(2)
    ]
    cal = load_llamacpp_calibration(LLM_CAL)
    entry = llm_entry()
    cfg = engine_config(ClusterConfig.from_dict({"instances": [entry]}).instances[0].llamacpp, False, cal)
    ref = replay_llamacpp(
        [(r.arrival_s, EngineRequest(id=r.id, prompt_tokens=40, output_tokens=4, max_tokens=4)) for r in reqs],
        cfg,
        cal.step,
    )
    got = by_id(run(reqs, [entry]))
    assert got.loc["s0", "first_token_s"] == got.loc["s1", "first_token_s"]  # one step for both prompts
    assert [got.loc[r.id, "finish_s"] for r in ref] == pytest.approx([r.finish_s for r in ref], rel=1e-12)


@pytest.mark.parametrize("policy", ["fifo", "hybrid"])
def test_two_instances_serve_everything_and_jump_equals_step(policy):
    reqs = chats(80, 2.5) + embeds(20, 0.5)
    instances = [llm_entry("cpu", count=2), emb_entry()]
    for inst in instances:
        inst["max_inflight"] = 4
    results = {mode: run(reqs, instances, make_policy(policy), mode) for mode in ("jump", "step")}
    jump, step = (results[m].records.sort_values("request_id").reset_index(drop=True) for m in ("jump", "step"))
    cols = ["request_id", "outcome", "instance_id", "dispatch_s", "first_token_s", "finish_s"]
    assert jump[cols].equals(step[cols])
    assert len(jump) == len(reqs) and (jump["outcome"] == "completed").all()
    served = set(jump.loc[jump["request_id"].str.startswith("c"), "instance_id"])
    assert served == {"cpu-0", "cpu-1"}
    assert set(jump.loc[jump["request_id"].str.startswith("e"), "instance_id"]) == {"emb"}
    stats = results["jump"].stats["instances"]
    assert stats["cpu-0"]["steps"] > 0 and stats["emb"]["steps"] > 0


def test_embedding_server_runs_each_input_as_a_slot_task():
    """A call of k inputs on a one-slot --embeddings server: k steps, one after another, plus the frontend."""
    cal = load_llamacpp_calibration(EMB_CAL)
    one = [
        Request(
            id="a",
            type=RequestType.EMBEDDING,
            model="gemma-embed",
            arrival_s=0.0,
            prompt_tokens=128,
            embedding_inputs=4,
            embedding_tokens=128,
        )
    ]
    got = by_id(run(one, [emb_entry()]))
    cfg = engine_config(ClusterConfig.from_dict({"instances": [emb_entry()]}).instances[0].llamacpp, True, cal)
    ref = replay_llamacpp(
        [(0.0, EngineRequest(id=f"a{i}", prompt_tokens=32, output_tokens=1)) for i in range(4)], cfg, cal.step
    )
    assert got.loc["a", "finish_s"] == pytest.approx(max(r.finish_s for r in ref) + cal.frontend_request_s)
    assert cal.frontend_request_s > 0


def test_views_show_slots_queue_and_rates():
    perf = load_llamacpp_perf(ClusterConfig.from_dict({"instances": [llm_entry()]}).instances[0])
    assert 50 < perf.prefill_tokens_per_s < 2000 and 0.01 < perf.decode_step_s < 0.5
    seen = []

    class Spy(FifoPolicy):
        def schedule(self, now, queue, instances):
            seen.extend(
                (now, v.running, v.waiting, v.queued_prefill_tokens, v.queued_decode_tokens, v.max_num_seqs)
                for v in instances
            )
            return super().schedule(now, queue, instances)

    reqs = [
        Request(
            id=f"q{i}",
            type=RequestType.LLM_CHAT,
            model="gemma-3-270m",
            arrival_s=0.01 * i,
            prompt_tokens=100,
            max_tokens=10,
            output_tokens=10,
        )
        for i in range(4)
    ]
    run(reqs, [llm_entry()], Spy())
    # At the fourth arrival the first request has a slot and its first step runs; the two that came
    # during that step wait for the server loop to pick them up after it (the next step's task pass).
    now, running, waiting, prefill, decode, slots = seen[3]
    assert now == pytest.approx(0.03) and (running, waiting, slots) == (1, 2, 2)
    assert prefill == 300 and decode == 30  # no step has finished yet: every prompt and output is ahead


def test_reject_when_busy_answers_503():
    reqs = chats(30, 5.0)
    res = by_id(run(reqs, [llm_entry(reject_when_busy=True)]))
    rejected = res[res["outcome"] == "rejected"]
    assert len(rejected) > 0 and rejected["reason"].str.contains("backend 503").all()
    assert (res["outcome"] == "completed").sum() + len(rejected) == len(reqs)


def test_prompt_longer_than_a_slot_is_refused_with_400():
    long = [
        Request(
            id="big",
            type=RequestType.LLM_CHAT,
            model="gemma-3-270m",
            arrival_s=0.0,
            prompt_tokens=600,
            max_tokens=4,
            output_tokens=4,
        )
    ]
    res = by_id(run(long, [llm_entry(n_ctx=1024)]))  # 512 tokens per slot
    assert res.loc["big", "outcome"] == "rejected" and "backend 400" in res.loc["big", "reason"]
    assert "llamacpp.n_ctx" in res.loc["big", "reason"]


@pytest.mark.parametrize(
    ("entry", "where", "says"),
    [
        ({**llm_entry(), "engine": "llama"}, "engine", "use 'vllm' or 'llamacpp'"),
        ({**llm_entry(), "llamacpp": {"n_parallel": 2}}, "llamacpp.calibration", "needs `llamacpp.calibration`"),
        ({**llm_entry(), "llamacpp": {"calibration": LLM_CAL, "n_parallel": 0}}, "llamacpp.n_parallel", ">= 1"),
        ({**llm_entry(), "llamacpp": {"calibration": LLM_CAL, "slots": 2}}, "llamacpp.slots", "unknown key"),
        ({**llm_entry(), "kind": "llm_embedding", "embedding_model": "e"}, "engine", "either chat"),
    ],
)
def test_config_errors_name_the_field(entry, where, says):
    with pytest.raises(ConfigFieldError) as err:
        ClusterConfig.from_dict({"instances": [entry]})
    assert f"cluster.instances[0].{where}" in str(err.value) and says in str(err.value)


def test_calibration_errors_name_the_fix():
    with pytest.raises(ValueError, match="no such file"):
        run(chats(2, 1.0), [{**llm_entry(), "llamacpp": {"calibration": "no-such-calibration"}}])
    with pytest.raises(ValueError, match="probed on an embedding server"):
        run(chats(2, 1.0), [{**llm_entry(), "llamacpp": {"calibration": EMB_CAL}}])


def test_bounds_price_a_request_alone_on_the_llamacpp_engine():
    """The offline bounds (`sagesched.bounds`) of a llama.cpp cluster: each request alone, as simulated."""
    from sagesched.bounds import isolated_latencies

    reqs = [dataclasses.replace(r, arrival_s=30.0 * i) for i, r in enumerate(chats(6, 1.0) + embeds(3, 1.0))]
    cluster = ClusterConfig.from_dict({"instances": [llm_entry(), emb_entry()]})
    bounds = isolated_latencies(reqs, cluster)
    got = by_id(run(reqs, [llm_entry(), emb_entry()]))
    for i, r in enumerate(reqs):
        e2e = (got.loc[r.id, "finish_s"] - r.arrival_s) * 1000.0
        assert bounds[i, 2] == pytest.approx(e2e, rel=1e-9)
    too_long = Request(
        id="x",
        type=RequestType.LLM_CHAT,
        model="gemma-3-270m",
        arrival_s=0.0,
        prompt_tokens=5000,
        max_tokens=4,
        output_tokens=4,
    )
    assert all(v != v for v in isolated_latencies([too_long], cluster)[0])  # NaN: no slot holds it


def _chats_at_zero(prefix: str, n: int, prompt: int, out: int) -> list[Request]:
    """`n` chats that all arrive at t=0."""
    return [
        Request(id=f"{prefix}{i}", type=RequestType.LLM_CHAT, model="gemma-3-270m", arrival_s=0.0,
                prompt_tokens=prompt, max_tokens=out, output_tokens=out)
        for i in range(n)
    ]  # fmt: skip


def _one_each(name: str, count: int, **host) -> list[dict]:
    """`count` llama.cpp servers (optionally on one host) that take one request each."""
    entry = llm_entry(name, count=count, **host)
    entry["max_inflight"] = 1
    return [entry]


def test_servers_on_one_host_share_its_cores():
    """Two one-thread servers on a one-core host: a step that starts while the other runs takes twice as
    long; on a two-core host (or with no host) they do not slow each other down."""
    reqs = _chats_at_zero("h", 2, prompt=64, out=8)

    def entries(**host):
        return _one_each("cpu", 2, **host)

    alone = by_id(run(reqs, entries()))
    assert set(alone["instance_id"]) == {"cpu-0", "cpu-1"}
    assert alone.loc["h0", "finish_s"] == alone.loc["h1", "finish_s"]
    two = by_id(run(reqs, entries(host="box", host_cpus=2)))
    assert two["finish_s"].tolist() == alone["finish_s"].tolist()
    one = by_id(run(reqs, entries(host="box", host_cpus=1)))
    assert (one["finish_s"] > alone["finish_s"]).all() and one["finish_s"].max() > 1.5 * alone["finish_s"].max()
    # One step each (a 4-token prompt, one output token), both from t=0 on one core: processor
    # sharing, each at half speed, so both end at twice the time alone.
    short = [dataclasses.replace(r, prompt_tokens=4, max_tokens=1, output_tokens=1) for r in reqs]
    base, shared = by_id(run(short, entries())), by_id(run(short, entries(host="box", host_cpus=1)))
    for rid in ("h0", "h1"):
        assert shared.loc[rid, "finish_s"] == pytest.approx(2 * base.loc[rid, "finish_s"], rel=1e-12)
    # Unequal steps (4 and 100 prompt tokens): the short one ends at twice its time alone; the long one
    # then runs alone, its work conserved: it ends at (alone time of both) = d_short + d_long.
    mixed = [short[0], dataclasses.replace(short[1], prompt_tokens=100)]
    base, shared = by_id(run(mixed, entries())), by_id(run(mixed, entries(host="box", host_cpus=1)))
    d0, d1 = base.loc["h0", "finish_s"], base.loc["h1", "finish_s"]
    assert d1 > 3 * d0
    assert shared.loc["h0", "finish_s"] == pytest.approx(2 * d0, rel=1e-12)
    assert shared.loc["h1", "finish_s"] == pytest.approx(d0 + d1, rel=1e-12)
    jump, step = (run(reqs, entries(host="box", host_cpus=1), mode=m).records for m in ("jump", "step"))
    assert jump["finish_s"].tolist() == step["finish_s"].tolist()


def test_one_host_needs_one_core_count():
    bad = [llm_entry("a", host="box", host_cpus=2), llm_entry("b", host="box", host_cpus=4)]
    with pytest.raises(ValueError, match="give every instance on one host the same host_cpus"):
        run(chats(2, 1.0), bad)


@pytest.mark.parametrize("policy", ["fifo", "hybrid", "slo_aware"])
def test_a_pool_of_vllm_and_llamacpp_instances_gives_the_same_records_in_both_modes(policy):
    """vLLM jumps over decode runs in jump mode while the llama.cpp instances step; records are equal."""
    from tiny_perf import make_provider

    tiny = make_provider(kv_tokens=20_000)

    def provider(cfg):
        return (load_llamacpp_perf(cfg), None) if cfg.engine == "llamacpp" else tiny(cfg)

    instances = [
        llm_entry("cpu", count=2, host="box", host_cpus=1),
        {"id": "gpu", "kind": "llm", "model": "gemma-3-270m", "max_inflight": 2, "vllm": {"max_num_seqs": 2}},
        emb_entry(),
    ]
    for inst in instances:
        inst["max_inflight"] = 2
    cluster = ClusterConfig.from_dict({"instances": instances})
    reqs = chats(120, 4.0) + embeds(20, 0.5)
    out = {
        mode: simulate(reqs, cluster, make_policy(policy), SimConfig(mode=mode), perf_provider=provider)
        .records.sort_values("request_id")
        .reset_index(drop=True)
        for mode in ("jump", "step")
    }
    same = ["request_id", "outcome", "instance_id", "reason"]
    assert out["jump"][same].equals(out["step"][same])
    for col in ("dispatch_s", "first_token_s", "finish_s"):  # vLLM's closed-form runs: equal to ~1e-14 s
        assert out["jump"][col].tolist() == pytest.approx(out["step"][col].tolist(), abs=1e-9)
    served = set(out["jump"]["instance_id"].dropna())
    assert {"gpu", "emb"} <= served and served & {"cpu-0", "cpu-1"}  # both engines serve


def test_an_embedding_input_longer_than_the_physical_batch_is_refused():
    """llama-server pools an input in one micro-batch: longer than n_ubatch is its 500."""
    req = Request(id="big", type=RequestType.EMBEDDING, model="gemma-embed", arrival_s=0.0, prompt_tokens=600,
                  embedding_inputs=1, embedding_tokens=600)  # fmt: skip
    res = by_id(run([req], [emb_entry(n_ubatch=512)]))
    assert res.loc["big", "outcome"] == "rejected" and "backend 500" in res.loc["big", "reason"]
    assert "llamacpp.n_ubatch" in res.loc["big", "reason"]
    split = dataclasses.replace(req, embedding_inputs=2)  # two inputs of 300 tokens fit
    assert by_id(run([split], [emb_entry(n_ubatch=512)])).loc["big", "outcome"] == "completed"


def _driver(reqs, entry, hashes=None):
    cal = load_llamacpp_calibration(LLM_CAL)
    cfg = engine_config(ClusterConfig.from_dict({"instances": [entry]}).instances[0].llamacpp, False, cal)
    pairs = [
        (
            r.arrival_s,
            EngineRequest(
                id=r.id,
                prompt_tokens=r.prompt_tokens,
                output_tokens=r.output_tokens or 1,
                max_tokens=r.max_tokens,
                prefix_hashes=r.prefix_hashes,
            ),
        )
        for r in reqs
    ]
    return {rec.id: rec for rec in replay_llamacpp(pairs, cfg, cal.step, frontend_request_s=cal.frontend_request_s)}


@pytest.mark.parametrize("rate", [2.0, 5.0])
def test_503s_are_decided_as_the_driver_decides_them(rate):
    """With reject_when_busy, a request that arrives during a step finds the slots that step frees."""
    reqs = chats(60, rate)
    entry = llm_entry(reject_when_busy=True)
    ref = _driver(reqs, entry)
    for mode in ("jump", "step"):
        got = by_id(run(reqs, [entry], mode=mode))
        refused = {rid for rid, rec in ref.items() if rec.status == 503}
        assert refused and set(got.index[got["outcome"] == "rejected"]) == refused
        for rid, rec in ref.items():
            if rec.status == 200:
                assert got.loc[rid, "finish_s"] == pytest.approx(rec.finish_s, rel=1e-9)


def test_the_slot_prompt_cache_agrees_with_the_driver_for_a_mid_step_arrival():
    """Shared prefixes, and requests arriving while the previous ones' last steps run."""
    base = chats(40, 3.0, seed=7)
    reqs = [dataclasses.replace(r, prefix_hashes=tuple(range(i % 3, i % 3 + 1 + r.prompt_tokens // 16))) for i, r in
            enumerate(base)]  # fmt: skip
    entry = llm_entry()
    ref = _driver(reqs, entry)
    got = by_id(run(reqs, [entry]))
    assert got["cached_prompt_tokens"].sum() > 0
    for rid, rec in ref.items():
        assert got.loc[rid, "finish_s"] == pytest.approx(rec.finish_s, rel=1e-9)


def test_three_servers_on_two_cores_each_get_two_thirds():
    reqs = _chats_at_zero("t", 3, prompt=4, out=1)

    def entries(**host):
        return _one_each("cpu", 3, **host)

    alone = by_id(run(reqs, entries()))
    shared = by_id(run(reqs, entries(host="box", host_cpus=2)))
    assert len(set(shared["instance_id"])) == 3
    for rid in alone.index:
        assert shared.loc[rid, "finish_s"] == pytest.approx(1.5 * alone.loc[rid, "finish_s"], rel=1e-12)


@pytest.mark.parametrize(
    ("entry", "where", "says"),
    [
        ({"id": "v", "kind": "llm", "model": "m", "llamacpp": {"n_parallel": 2}}, "llamacpp", "add `engine: llamacpp`"),
        ({**llm_entry(), "calibration": "x.yaml"}, "calibration", "llamacpp.calibration"),
        ({**llm_entry(), "llamacpp": {"calibration": LLM_CAL, "host_cpus": 2}}, "llamacpp.host_cpus", "set `host`"),
        ({**llm_entry(), "llamacpp": {"calibration": LLM_CAL, "host": ""}}, "llamacpp.host", "non-empty"),
    ],
)
def test_knobs_that_would_be_ignored_are_refused(entry, where, says):
    with pytest.raises(ConfigFieldError) as err:
        ClusterConfig.from_dict({"instances": [entry]})
    assert f"cluster.instances[0].{where}" in str(err.value) and says in str(err.value)


def test_asking_a_started_steps_time_again_changes_nothing():
    """On a shared host the first `step_time_s` call starts the step; a second caller must not count it twice."""
    from sagesched.sim.engines.llamacpp_instance import SYNC, CpuHost, LlamaCppInstanceCore, LlamaCppPlan

    perf = load_llamacpp_perf(ClusterConfig.from_dict({"instances": [llm_entry()]}).instances[0])
    core = LlamaCppInstanceCore(perf)
    host = CpuHost("box", 1)

    class Clock:  # what the host reads of the simulator: its clock
        class env:
            now = 0.0

    host.sim = Clock
    core.host = host
    host.members.append((None, core))
    core.add(EngineRequest(id="a", prompt_tokens=8, output_tokens=2, max_tokens=2))
    assert core.plan_step() is SYNC
    core.finish_step(SYNC)
    plan = core.plan_step()
    assert isinstance(plan, LlamaCppPlan)
    first = core.step_time_s(plan)
    assert core.step_time_s(plan) == first and host.busy == 1


def test_a_chat_frontend_cost_is_added_as_the_driver_adds_it(tmp_path):
    """The shipped chat calibration has no frontend cost; one with 20 ms must shift first token and finish."""
    cal = dataclasses.replace(load_llamacpp_calibration(LLM_CAL), frontend_request_s=0.02)
    path = cal.write(tmp_path / "chat-fe.yaml")
    entry = {**llm_entry(), "llamacpp": {"calibration": str(path), "n_parallel": 2}}
    reqs = chats(30, 2.0)
    cfg = engine_config(ClusterConfig.from_dict({"instances": [entry]}).instances[0].llamacpp, False, cal)
    pairs = [(r.arrival_s, EngineRequest(id=r.id, prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens or 1,
                                         max_tokens=r.max_tokens)) for r in reqs]  # fmt: skip
    ref = {rec.id: rec for rec in replay_llamacpp(pairs, cfg, cal.step, frontend_request_s=0.02)}
    got = by_id(run(reqs, [entry]))
    for rid, rec in ref.items():
        assert got.loc[rid, "first_token_s"] == pytest.approx(rec.first_token_s, rel=1e-9)
        assert got.loc[rid, "finish_s"] == pytest.approx(rec.finish_s, rel=1e-9)
