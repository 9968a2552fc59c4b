"""Hybrid: real embedding batches, the batching window, mixed-instance shares and the LLM fallback."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagesched.core import Assignment, RejectCode, Rejection
from sagesched.policies import make_policy
from sagesched.policies.hybrid import (
    LLM_FALLBACK_POLICIES,
    RULE_EXPIRED,
    RULE_FULL,
    RULE_IDLE,
    RULE_OVERSIZE,
    HybridConfig,
    HybridPolicy,
)

WINDOW_S = 0.010  # the default max_embedding_wait_ms


def emb(make_request, rid, inputs=1, tokens=None, **kw):
    return make_request(
        rid, "embedding", inputs=inputs, prompt_tokens=tokens if tokens is not None else 10 * inputs, **kw
    )


def assignments(decisions):
    return [d for d in decisions if isinstance(d, Assignment)]


def batch_stats(decision, by_id):
    reqs = [by_id[i] for i in decision.request_ids]
    return sum(r.embedding_inputs for r in reqs), sum(r.work_tokens for r in reqs), {r.model for r in reqs}


def slots_by_type(decisions, by_id, instance_id):
    """(llm, embedding) requests this call put on `instance_id`."""
    kinds = Counter(
        "emb" if by_id[i].is_embedding else "llm"
        for d in assignments(decisions)
        if d.instance_id == instance_id
        for i in d.request_ids
    )
    return kinds["llm"], kinds["emb"]


# -- configuration ---------------------------------------------------------------------------------


def test_defaults_match_the_seed_and_the_benchmark():
    c = HybridConfig()
    # The seed's stated defaults...
    assert (c.embedding_batch_size, c.hybrid_instance_ratio, c.prefer_specialized_instances) == (32, 0.7, True)
    # ...and the ones chosen from the policy benchmark (docs/policies/hybrid.md).
    assert (c.embedding_priority, c.llm_fallback_policy, c.release_when_idle) == ("normal", "slo_aware", True)
    assert c.admission and HybridPolicy().llm_fallback.config.admission
    # Admission reaches only a fallback that has it; an explicit fallback config wins.
    assert HybridPolicy(llm_fallback_policy="adaptive").llm_fallback.name == "adaptive"
    explicit = HybridPolicy(llm_fallback_config={"admission": False}).llm_fallback
    assert not explicit.config.admission


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"embedding_priority": "urgent"}, "high, normal, low, adaptive"),
        ({"llm_fallback_policy": "hybrid"}, "fifo, priority, slo_aware, adaptive"),
        ({"hybrid_instance_ratio": 1.5}, "[0, 1]"),
        ({"min_embedding_batch_size": 40}, "embedding_batch_size"),
        ({"embedding_batch_size": 0}, ">= 1"),
        ({"max_embedding_wait_ms": -1}, ">= 0"),
        ({"llm_holdback_ms": -5}, "llm_holdback_ms must be >= 0"),
        ({"llm_fallback_policy": "priority", "llm_fallback_config": {"bogus": 1}}, "aging_interval_s"),
    ],
)
def test_bad_config_names_the_fix(overrides, names):
    with pytest.raises(ValueError) as err:
        make_policy("hybrid", **overrides)
    assert names in str(err.value)


def test_fallback_config_reaches_the_fallback():
    policy = make_policy("hybrid", llm_fallback_policy="priority", llm_fallback_config={"aging_interval_s": 3.0})
    assert policy.llm_fallback.config.aging_interval_s == 3.0
    assert policy.describe()["llm_fallback_config"] == {"aging_interval_s": 3.0}


# -- batch bounds ----------------------------------------------------------------------------------


def test_text_bound_is_never_exceeded_and_full_batches_go(make_request, make_view, check_decisions):
    # 10 requests x 5 texts = 50 texts: one full batch of 30 (a 7th would make 35 > 32) goes now,
    # the other 20 texts are a partial batch held for the window.
    queue = [emb(make_request, f"e{i}", inputs=5, arrival_s=0.0) for i in range(10)]
    instances = [make_view("tei", "embedding")]
    decisions = HybridPolicy().schedule(0.001, queue, instances)
    assigned, _ = check_decisions(decisions, queue, instances)
    (batch,) = assignments(decisions)
    assert batch.rule == RULE_FULL and batch.is_batch
    assert batch.request_ids == tuple(f"e{i}" for i in range(6))  # arrival order, ties by id
    assert len(assigned) == 6


def test_token_budget_is_never_exceeded(make_request, make_view, check_decisions):
    queue = [emb(make_request, f"e{i}", inputs=1, tokens=300) for i in range(7)]
    instances = [make_view("tei", "embedding")]
    policy = make_policy("hybrid", embedding_batch_token_budget=1000, embedding_holdback_ms=0)
    decisions = policy.schedule(0.001, queue, instances)
    check_decisions(decisions, queue, instances)
    by_id = {r.id: r for r in queue}
    sizes = [batch_stats(d, by_id)[1] for d in assignments(decisions)]
    assert sizes == [900, 900]  # two full batches of 3; the 7th (300 tokens) waits for company


def test_background_embeddings_are_held_back_behind_a_long_embedding_queue(make_request, make_view):
    """Priority holdback: work without an SLO joins an embedding engine's FIFO queue only while at
    most `embedding_holdback_ms` of work is ahead of it; SLO-bound queries still go, and never share
    a call with it."""
    ingest = [emb(make_request, f"b{i}", inputs=32, tokens=16_384) for i in range(3)]
    query = emb(make_request, "q", inputs=1, tokens=20, e2e_ms=50.0, priority="high")
    tei = make_view("tei", "embedding", queued_prefill_tokens=1_000)  # 20 ms ahead at 50k tokens/s
    decisions = HybridPolicy(max_embedding_wait_ms=0).schedule(0.0, [*ingest, query], [tei])
    assert [d.request_ids for d in assignments(decisions)] == [("q",)]
    # With the queue short, one ingest call goes (328 ms of work); the next sees that queue and waits.
    short = make_view("tei", "embedding", queued_prefill_tokens=100)
    decisions = HybridPolicy(max_embedding_wait_ms=0).schedule(0.0, ingest, [short])
    assert [len(d.request_ids) for d in assignments(decisions)] == [1]
    # Off (0): all of it goes at once, as before.
    decisions = HybridPolicy(max_embedding_wait_ms=0, embedding_holdback_ms=0).schedule(0.0, ingest, [tei])
    assert sum(len(d.request_ids) for d in assignments(decisions)) == 3


def test_a_held_back_ingest_backlog_is_not_ranked_request_by_request(make_request, make_view, monkeypatch):
    """With thousands of ingest requests held at the gateway behind a long embedding queue, one call
    ranks the targets once per input count, not once per held request (that made a call quadratic in
    the backlog: an embedding-heavy run at 8x the trace rate took over 20 minutes). The decisions are
    the same: the query goes; every 32-input ingest request waits (the short queue has room for 5
    inputs only); a 2-input one goes there, and so does a 64-input one, larger than that engine's
    whole input cap (which passes it, so that the engine's own error can end it)."""
    ingest = [emb(make_request, f"b{i:04d}", inputs=32, tokens=16_384, arrival_s=i * 1e-3) for i in range(2_000)]
    small = emb(make_request, "s", inputs=2, tokens=512, arrival_s=3.0)
    big = emb(make_request, "big", inputs=64, tokens=128, arrival_s=3.5)
    query = emb(make_request, "q", inputs=1, tokens=20, e2e_ms=50.0, priority="high", arrival_s=3.0)
    busy = make_view("tei", "embedding", queued_prefill_tokens=1_000)  # 20 ms ahead: over the 15 ms holdback
    narrow = make_view(
        "tei2", "embedding", max_embedding_inputs=40, embedding_inputs_inflight=35, max_client_batch_size=128
    )
    ranked: list[str] = []
    original = HybridPolicy._embedding_targets

    def counting(self, call, head, ignore_inputs=False):
        ranked.append(head.id)
        return original(self, call, head, ignore_inputs)

    monkeypatch.setattr(HybridPolicy, "_embedding_targets", counting)
    queue = [*ingest, small, big, query]
    decisions = HybridPolicy(max_embedding_wait_ms=0).schedule(4.0, queue, [busy, narrow])
    placed = {d.request_ids: d.instance_id for d in assignments(decisions)}
    assert placed == {("q",): "tei2", ("s",): "tei2", ("big",): "tei2"}
    assert len(ranked) <= 5, ranked[:10]


def test_llm_work_below_high_priority_is_held_back_behind_a_queued_prefill(make_request, make_view):
    """LLM holdback: normal and lower-priority LLM work goes only where at most `llm_holdback_ms`
    of prefill is queued; high-priority work still goes, and the held work stays queued (not
    rejected) until the queue drains. A mixed GPU's embedding queue does not count."""
    # 10k tokens/s: 1,000 queued prompt tokens are 100 ms ahead, over the 50 ms default.
    busy = make_view("gpu", "llm", queued_prefill_tokens=1_000, prefill_tokens_per_s=10_000.0)
    normal = make_request("n", prompt_tokens=200, arrival_s=0.0)
    urgent = make_request("u", prompt_tokens=200, arrival_s=0.5, priority="high")
    decisions = HybridPolicy().schedule(1.0, [normal, urgent], [busy])
    assert [d.request_ids for d in decisions] == [("u",)]
    # Drained to 40 ms: the normal request goes; then this call's own placement counts as queued.
    drained = make_view("gpu", "llm", queued_prefill_tokens=400, prefill_tokens_per_s=10_000.0)
    more = [make_request(f"n{i}", prompt_tokens=200, arrival_s=float(i)) for i in range(3)]
    decisions = HybridPolicy().schedule(5.0, more, [drained])
    assert [d.request_ids for d in assignments(decisions)] == [("n0",)] and len(decisions) == 1
    # A mixed GPU's queued embedding tokens are not ahead of LLM work.
    mixed = make_view(
        "mix",
        "llm_embedding",
        queued_prefill_tokens=5_000,
        queued_embedding_tokens=5_000,
        prefill_tokens_per_s=10_000.0,
    )
    decisions = HybridPolicy().schedule(1.0, [normal], [mixed])
    assert [d.request_ids for d in decisions] == [("n",)]
    # Off (0): everything goes at once.
    decisions = HybridPolicy(llm_holdback_ms=0).schedule(1.0, [normal, urgent], [busy])
    assert sorted(r for d in decisions for r in d.request_ids) == ["n", "u"]


def test_max_client_batch_size_of_the_target_caps_the_batch(make_request, make_view):
    queue = [emb(make_request, f"e{i}", inputs=3) for i in range(6)]
    instances = [make_view("tei", "embedding", max_client_batch_size=8)]
    decisions = HybridPolicy().schedule(0.001, queue, instances)
    by_id = {r.id: r for r in queue}
    batches = assignments(decisions)
    # Two of 3 texts per batch (a third would make 9 > 8); the last pair could still grow: held.
    assert [batch_stats(b, by_id)[0] for b in batches] == [6, 6]
    assert {b.rule for b in batches} == {RULE_FULL}


def test_an_exactly_full_batch_is_one_backend_call(make_request, make_view):
    queue = [emb(make_request, f"e{i}", inputs=4) for i in range(8)]  # 32 texts
    decisions = HybridPolicy().schedule(0.0, queue, [make_view("tei", "embedding")])
    (batch,) = decisions
    assert set(batch.request_ids) == {r.id for r in queue} and batch.rule == RULE_FULL


def test_oversized_request_goes_alone_and_too_large_is_rejected(make_request, make_view, check_decisions):
    queue = [emb(make_request, "big", inputs=40), emb(make_request, "huge", inputs=100), emb(make_request, "small")]
    instances = [make_view("tei", "embedding", max_client_batch_size=64), make_view("mix", "llm_embedding")]
    decisions = make_policy("hybrid", release_when_idle=False).schedule(0.0, queue, instances)
    check_decisions(decisions, queue, instances)
    by_rid = {i: d for d in decisions for i in (d.request_ids if isinstance(d, Assignment) else (d.request_id,))}
    assert by_rid["big"].request_ids == ("big",) and by_rid["big"].rule == RULE_OVERSIZE
    assert by_rid["big"].instance_id == "tei"  # the only instance whose max_client_batch_size fits 40
    assert isinstance(by_rid["huge"], Rejection) and by_rid["huge"].code == RejectCode.TOO_LARGE
    assert "64" in by_rid["huge"].reason
    assert "small" not in by_rid  # a partial batch of one: held for the window


def test_batches_never_mix_models(make_request, make_view, check_decisions):
    queue = [emb(make_request, f"a{i}", model="A", inputs=8) for i in range(5)]
    queue += [emb(make_request, f"b{i}", model="B", inputs=8) for i in range(5)]
    instances = [make_view("tei", "embedding", models=("A", "B"))]
    decisions = HybridPolicy().schedule(1.0, queue, instances)  # every window expired: all go
    assigned, _ = check_decisions(decisions, queue, instances)
    by_id = {r.id: r for r in queue}
    assert sorted(assigned) == sorted(by_id)
    for d in assignments(decisions):
        assert len(batch_stats(d, by_id)[2]) == 1
        assert batch_stats(d, by_id)[0] <= 32


# -- the window and next_wakeup ---------------------------------------------------------------------


def test_partial_batch_waits_for_the_window_then_goes(make_request, make_view):
    policy = make_policy("hybrid", release_when_idle=False)
    instances = [make_view("tei", "embedding")]
    queue = [emb(make_request, "e0", arrival_s=1.000), emb(make_request, "e1", arrival_s=1.004)]
    assert policy.schedule(1.005, queue, instances) == []
    assert policy.next_wakeup(1.005) == pytest.approx(1.000 + WINDOW_S)
    (batch,) = policy.schedule(1.010, queue, instances)
    assert batch.rule == RULE_EXPIRED and set(batch.request_ids) == {"e0", "e1"}
    assert policy.next_wakeup(1.010) is None


def test_next_wakeup_is_the_oldest_held_arrival_plus_window(make_request, make_view):
    policy = make_policy("hybrid", max_embedding_wait_ms=50, release_when_idle=False)
    instances = [make_view("tei", "embedding", models=("A", "B"))]
    queue = [
        emb(make_request, "b", model="B", arrival_s=2.03),
        emb(make_request, "a", model="A", arrival_s=2.01),
        emb(make_request, "a2", model="A", arrival_s=2.04),
    ]
    assert policy.schedule(2.05, queue, instances) == []
    assert policy.next_wakeup(2.05) == pytest.approx(2.06)
    # At 2.06 model A's window closes (both A requests go); B's closes at 2.08.
    (batch,) = policy.schedule(2.06, queue, instances)
    assert set(batch.request_ids) == {"a", "a2"}
    assert policy.next_wakeup(2.06) == pytest.approx(2.08)


def test_no_wakeup_without_held_embeddings(make_request, make_view):
    policy = HybridPolicy()
    policy.schedule(0.0, [make_request("chat")], [make_view("gpu", "llm")])
    assert policy.next_wakeup(0.0) is None


def test_min_size_holds_an_idle_release_until_reached(make_request, make_view):
    policy = make_policy("hybrid", min_embedding_batch_size=4, release_when_idle=True)
    instances = [make_view("tei", "embedding")]
    few = [emb(make_request, f"e{i}", arrival_s=0.0) for i in range(3)]
    assert policy.schedule(0.002, few, instances) == []  # idle target, but 3 < 4 texts
    enough = [*few, emb(make_request, "e3", arrival_s=0.001)]
    (batch,) = policy.schedule(0.002, enough, instances)
    assert batch.rule == RULE_IDLE and len(batch.request_ids) == 4
    # A busy target gives no idle release: the batch waits for full or the window.
    busy = [make_view("tei", "embedding", running=1, embedding_inflight=1)]
    assert policy.schedule(0.002, enough, busy) == []


def test_min_size_holds_a_batch_cut_by_free_slots_until_the_window(make_request, make_view):
    policy = make_policy("hybrid", min_embedding_batch_size=4, embedding_batch_size=8)
    instances = [make_view("tei", "embedding", max_inflight=4, running=2, embedding_inflight=2)]
    queue = [emb(make_request, f"e{i}", arrival_s=0.0) for i in range(8)]  # a full batch of 8...
    assert policy.schedule(0.005, queue, instances) == []  # ...but only 2 slots: 2 texts < min 4
    (batch,) = policy.schedule(0.010, queue, instances)
    assert batch.rule == RULE_EXPIRED and batch.request_ids == ("e0", "e1")


def test_higher_priority_embeddings_are_batched_and_released_first(make_request, make_view):
    queue = [emb(make_request, f"n{i}", inputs=8, arrival_s=0.0, priority="normal") for i in range(4)]
    queue += [emb(make_request, f"h{i}", inputs=8, arrival_s=0.005, priority="high") for i in range(4)]
    instances = [make_view("tei", "embedding", max_inflight=5)]
    decisions = HybridPolicy().schedule(0.006, queue, instances)
    (first, second) = assignments(decisions)
    assert set(first.request_ids) == {f"h{i}" for i in range(4)}  # the full high batch first
    assert first.priority_hint == 1  # normal embedding_priority: the batch's best request priority
    assert second.request_ids == ("n0",)  # one slot left: the cut normal batch (min 1) goes too


def test_aging_keeps_low_priority_embeddings_from_starving(make_request, make_view):
    policy = make_policy("hybrid", embedding_aging_ms=100, embedding_batch_size=1)
    instances = [make_view("tei", "embedding", max_inflight=1)]
    low = emb(make_request, "low", priority="low", arrival_s=0.0)
    stream = [emb(make_request, f"h{i}", priority="high", arrival_s=0.15) for i in range(3)]
    (d,) = policy.schedule(0.15, [low, *stream], instances)
    assert d.request_ids == ("h0",)  # low (3) has aged to class 2 only: the high (1) stream goes first
    (d,) = policy.schedule(0.30, [low, *stream[1:]], instances)
    assert d.request_ids == ("low",)  # class 0 after 3 x 100 ms: ahead of every later arrival


# -- instance preference and the mixed-instance ratio ----------------------------------------------


def test_full_specialized_instances_overflow_to_mixed(make_request, make_view, check_decisions):
    instances = [
        make_view("mix", "llm_embedding"),
        make_view("tei", "embedding", max_inflight=2),
        make_view("gpu", "llm", max_inflight=2),
    ]
    queue = [emb(make_request, f"e{i}", inputs=16) for i in range(4)]
    queue += [make_request(f"c{i}", arrival_s=float(i) / 100) for i in range(3)]
    decisions = HybridPolicy().schedule(1.0, queue, instances)
    check_decisions(decisions, queue, instances)
    placed = {i: d.instance_id for d in assignments(decisions) for i in d.request_ids}
    assert Counter(placed[f"c{i}"] for i in range(3)) == {"gpu": 2, "mix": 1}  # gpu holds only 2
    assert Counter(placed[f"e{i}"] for i in range(4)) == {"tei": 2, "mix": 2}  # 2 slots on tei, rest overflow


def test_llm_work_goes_to_the_mixed_instance_once_it_is_less_loaded(make_request, make_view):
    """Load-aware overflow: the LLM-only instance wins ties, but not with far more work than the mixed one."""
    chat = [make_request("c", prompt_tokens=100, max_tokens=50)]

    def target(gpu, mix, **config):
        (d,) = make_policy("hybrid", **config).schedule(1.0, chat, [gpu, mix])
        return d.instance_id

    idle_gpu, idle_mix = make_view("gpu", "llm", max_inflight=64), make_view("mix", "llm_embedding", max_inflight=64)
    assert target(idle_gpu, idle_mix) == "gpu"  # equal load: specialized first
    # The LLM-only GPU is far from full (30 of 64 slots) but carries much more work: the mixed one takes it.
    busy_gpu = make_view("gpu", "llm", max_inflight=64, running=30, queued_decode_tokens=6000)
    light_mix = make_view("mix", "llm_embedding", max_inflight=64, running=5, queued_decode_tokens=1000)
    assert target(busy_gpu, light_mix) == "mix"
    # The ratio applies while the mixed GPU also serves embeddings: 1000 + 150 tokens over 0.7 of its speed
    # is more than 950 + 150 over the whole LLM-only GPU, so the LLM-only one keeps the request...
    gpu = make_view("gpu", "llm", queued_decode_tokens=950)
    mix_emb = make_view("mix", "llm_embedding", running=2, embedding_inflight=1, queued_decode_tokens=1000)
    assert target(gpu, mix_emb) == "gpu"
    # ...but with no embedding work on it the mixed GPU counts at full speed and is the less loaded.
    mix_llm = make_view("mix", "llm_embedding", running=1, queued_decode_tokens=900)
    assert target(gpu, mix_llm) == "mix"
    # Speed counts: an LLM-only instance ten times slower is the more loaded one at equal work.
    slow_gpu = make_view("gpu", "llm", prefill_tokens_per_s=1_000.0)
    assert target(slow_gpu, idle_mix) == "mix"
    # Without the preference the fallback's own rule places it (least outstanding work).
    assert target(busy_gpu, light_mix, prefer_specialized_instances=False, llm_fallback_policy="fifo") == "mix"


def test_a_mixed_gpus_embedding_queue_is_not_llm_load(make_request, make_view):
    """A mixed GPU's `queued_prefill_tokens` also counts its embedding engine's queue, which runs
    beside the LLM engine: the load rule counts only the LLM work (the interference is the ratio's).
    Counting a queued 16k-token ingest batch as LLM work sent every chat to the LLM-only GPU at
    embedding_heavy 3x (reports/policy_benchmark)."""
    chat = [make_request("c", prompt_tokens=100, max_tokens=50, priority="high")]
    gpu = make_view("gpu", "llm", running=40, queued_prefill_tokens=1_000, queued_decode_tokens=10_000)
    # 16,384 embedding tokens queued at the TEI engine, 500 LLM prompt tokens: (500 + 3000 + 150) / 0.7
    # of its speed is less than the LLM-only GPU's 11,150.
    mix = make_view(
        "mix",
        "llm_embedding",
        running=21,
        embedding_inflight=1,
        queued_prefill_tokens=16_884,
        queued_embedding_tokens=16_384,
        queued_decode_tokens=3_000,
    )
    for policy in (make_policy("hybrid"), make_policy("hybrid", admission=False)):  # lone paths both
        (d,) = policy.schedule(1.0, chat, [gpu, mix])
        assert d.instance_id == "mix"
    # With the embedding queue counted as LLM work it would be the more loaded one: the LLM-only GPU
    # wins once the mixed GPU's own LLM work is larger.
    heavier = make_view(
        "mix",
        "llm_embedding",
        running=21,
        embedding_inflight=1,
        queued_prefill_tokens=16_384 + 8_000,
        queued_embedding_tokens=16_384,
        queued_decode_tokens=3_000,
    )
    (d,) = make_policy("hybrid").schedule(1.0, chat, [gpu, heavier])
    assert d.instance_id == "gpu"


def test_embeddings_overflow_to_a_mixed_instance_when_the_tei_one_is_more_loaded(make_request, make_view):
    queue = [emb(make_request, "e", inputs=1, tokens=10)]

    def target(tei, mix, now=0.0):
        (d,) = HybridPolicy().schedule(now, queue, [tei, mix])
        return d.instance_id

    mix = make_view("mix", "llm_embedding", prefill_tokens_per_s=10_000.0)
    assert target(make_view("tei", "embedding"), mix) == "tei"  # idle TEI: faster result there
    backlog = make_view("tei", "embedding", running=1, queued_prefill_tokens=5_000)  # 0.1 s queued
    assert target(backlog, mix) == "mix"  # not full, but 0.1 s behind: the idle mixed GPU answers sooner
    # A busy LLM side slows a co-located batch: its predicted time there counts colocated_embedding_slowdown
    # (1.5) times. 0.2 ms on the mixed GPU counts as 0.3 ms, behind a TEI GPU answering in 0.28 ms...
    mix_llm = make_view("mix", "llm_embedding", running=5, prefill_tokens_per_s=10_000.0)
    near = make_view("tei", "embedding", queued_prefill_tokens=4)  # (4 + 10) tokens / 50k/s = 0.28 ms
    assert target(near, mix_llm) == "tei"
    assert target(near, mix) == "mix"  # ...but with its LLM side idle the mixed GPU is the faster one
    assert target(near, mix_llm.__class__(**{**_fields(mix_llm), "running": 0})) == "mix"
    # The embedding speed of a mixed GPU is its embedding engine's, not its LLM's prefill rate, and
    # only its embedding engine's queue is ahead of the batch, not the LLM's prefill backlog.
    slow_prefill = make_view(
        "mix", "llm_embedding", prefill_tokens_per_s=1_000.0, queued_prefill_tokens=50_000, queued_embedding_tokens=0
    )
    backlog_tei = make_view("tei", "embedding", running=1, queued_prefill_tokens=500)  # 10 ms queued
    # (A query with an SLO: work without one waits while a mixed GPU's LLM side is prefilling,
    # `mixed_ingest_guard_ms`, tests/policies/test_hybrid_margin.py.)
    query = [emb(make_request, "q", inputs=1, tokens=10, e2e_ms=50)]
    (d,) = HybridPolicy().schedule(0.0, query, [backlog_tei, slow_prefill])
    assert d.instance_id == "mix"


def _fields(view):
    import dataclasses

    return {f.name: getattr(view, f.name) for f in dataclasses.fields(view)}


def test_without_preference_load_decides(make_request, make_view):
    instances = [
        make_view("tei", "embedding", queued_prefill_tokens=500_000),  # 10 s of work queued
        make_view("mix", "llm_embedding"),
    ]
    queue = [emb(make_request, "e", inputs=32)]
    (d,) = make_policy("hybrid", prefer_specialized_instances=False).schedule(0.0, queue, instances)
    assert d.instance_id == "mix"
    # With the preference too: 10 s behind is more load than an idle mixed GPU (overflow by load).
    (d,) = HybridPolicy().schedule(0.0, queue, instances)
    assert d.instance_id == "mix"
    # A light backlog on the TEI instance (100 tokens ahead of 320) against a mixed GPU whose LLM side
    # is busy (the batch would take 1.5x there): the TEI instance answers first, so it keeps the batch...
    instances = [
        make_view("tei", "embedding", running=1, queued_prefill_tokens=100),
        make_view("mix", "llm_embedding", running=3),
    ]
    (d,) = HybridPolicy().schedule(0.0, queue, instances)
    assert d.instance_id == "tei"
    # ...while an idle mixed GPU (same embedding speed, nothing queued) answers first.
    instances[1] = make_view("mix", "llm_embedding")
    (d,) = HybridPolicy().schedule(0.0, queue, instances)
    assert d.instance_id == "mix"


def test_ratio_caps_both_types_on_a_mixed_instance_while_both_wait(make_request, make_view, check_decisions):
    instances = [make_view("mix", "llm_embedding", max_inflight=10)]
    queue = [make_request(f"c{i}", arrival_s=0.0) for i in range(20)]
    queue += [emb(make_request, f"e{i}", arrival_s=0.0) for i in range(20)]
    decisions = make_policy("hybrid", embedding_batch_size=2, llm_holdback_ms=0).schedule(1.0, queue, instances)
    check_decisions(decisions, queue, instances)
    by_id = {r.id: r for r in queue}
    assert slots_by_type(decisions, by_id, "mix") == (7, 3)
    # Load already there counts: 6 LLM in flight leave room for 1 more LLM, 3 embeddings.
    busy = [make_view("mix", "llm_embedding", max_inflight=10, running=6)]
    decisions = make_policy("hybrid", embedding_batch_size=2, llm_holdback_ms=0).schedule(1.0, queue, busy)
    assert slots_by_type(decisions, by_id, "mix") == (1, 3)
    # Over its share already (9 LLM): no more LLM, embeddings get the one free slot.
    over = [make_view("mix", "llm_embedding", max_inflight=10, running=9)]
    decisions = make_policy("hybrid", embedding_batch_size=2, llm_holdback_ms=0).schedule(1.0, queue, over)
    assert slots_by_type(decisions, by_id, "mix") == (0, 1)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_ratio_is_honoured_at_every_setting(ratio, make_request, make_view):
    instances = [make_view("mix", "llm_embedding", max_inflight=8)]
    queue = [make_request(f"c{i}") for i in range(10)] + [emb(make_request, f"e{i}") for i in range(10)]
    decisions = make_policy("hybrid", hybrid_instance_ratio=ratio, llm_holdback_ms=0).schedule(1.0, queue, instances)
    llm, embs = slots_by_type(decisions, {r.id: r for r in queue}, "mix")
    assert llm <= ratio * 8 and embs <= (1 - ratio) * 8
    assert llm + embs == int(ratio * 8) + int((1 - ratio) * 8)


def test_one_type_alone_uses_the_whole_mixed_instance(make_request, make_view):
    instances = [make_view("mix", "llm_embedding", max_inflight=10)]
    llm_only = [make_request(f"c{i}") for i in range(12)]
    decisions = HybridPolicy(llm_holdback_ms=0).schedule(1.0, llm_only, instances)
    assert slots_by_type(decisions, {r.id: r for r in llm_only}, "mix") == (10, 0)
    emb_only = [emb(make_request, f"e{i}") for i in range(12)]
    decisions = make_policy("hybrid", embedding_batch_size=3, llm_holdback_ms=0).schedule(1.0, emb_only, instances)
    assert slots_by_type(decisions, {r.id: r for r in emb_only}, "mix") == (0, 10)


def test_slots_the_other_type_leaves_are_handed_over_in_the_same_call(make_request, make_view):
    # Embeddings claim first (capped at 3 while 2 LLM requests wait); once those 2 are placed
    # nothing LLM waits, so the third round gives embeddings the remaining 5 slots.
    instances = [make_view("mix", "llm_embedding", max_inflight=10)]
    queue = [make_request("c0"), make_request("c1")] + [emb(make_request, f"e{i}") for i in range(20)]
    for priority in ("high", "low"):
        policy = make_policy("hybrid", embedding_priority=priority, embedding_batch_size=1)
        decisions = policy.schedule(1.0, queue, instances)
        assert slots_by_type(decisions, {r.id: r for r in queue}, "mix") == (2, 8)


def test_held_embeddings_reserve_their_share(make_request, make_view):
    # A partial batch held for its window still counts as waiting: LLM may take only 7 of 10.
    instances = [make_view("mix", "llm_embedding", max_inflight=10)]
    queue = [make_request(f"c{i}") for i in range(12)] + [emb(make_request, "e", arrival_s=0.999)]
    decisions = make_policy("hybrid", release_when_idle=False, llm_holdback_ms=0).schedule(1.0, queue, instances)
    assert slots_by_type(decisions, {r.id: r for r in queue}, "mix") == (7, 0)
    # With the idle release (default) the embedding goes at once: nothing waits, LLM takes the rest.
    decisions = HybridPolicy(llm_holdback_ms=0).schedule(1.0, queue, instances)
    assert slots_by_type(decisions, {r.id: r for r in queue}, "mix") == (9, 1)


# -- embedding_priority ----------------------------------------------------------------------------


def _mixed_case(make_request, make_view, emb_arrival=0.0, llm_arrival=0.0, n_emb=4, n_llm=4):
    instances = [make_view("mix", "llm_embedding", max_inflight=20)]
    queue = [make_request(f"c{i}", arrival_s=llm_arrival) for i in range(n_llm)]
    queue += [emb(make_request, f"e{i}", inputs=8, arrival_s=emb_arrival) for i in range(n_emb)]
    return queue, instances


def _first_type(decisions, by_id):
    return "embedding" if by_id[decisions[0].request_ids[0]].is_embedding else "llm"


@pytest.mark.parametrize(
    ("mode", "first", "emb_hint", "llm_hint"),
    [("high", "embedding", 0, 2), ("low", "llm", 4, 2), ("normal", "embedding", 2, 2)],
)
def test_embedding_priority_sets_claim_order_and_hints(mode, first, emb_hint, llm_hint, make_request, make_view):
    queue, instances = _mixed_case(make_request, make_view)
    decisions = make_policy("hybrid", embedding_priority=mode).schedule(1.0, queue, instances)
    by_id = {r.id: r for r in queue}
    assert _first_type(decisions, by_id) == first
    hints = {("embedding" if by_id[d.request_ids[0]].is_embedding else "llm"): d.priority_hint for d in decisions}
    assert hints == {"embedding": emb_hint, "llm": llm_hint}


def test_normal_priority_lets_the_older_type_claim_first(make_request, make_view):
    queue, instances = _mixed_case(make_request, make_view, emb_arrival=0.5, llm_arrival=0.4)
    decisions = HybridPolicy().schedule(1.0, queue, instances)
    assert _first_type(decisions, {r.id: r for r in queue}) == "llm"


def test_adaptive_priority_follows_queue_ages(make_request, make_view):
    by_age = {}
    for emb_age_ms in (5.0, 200.0):
        # One LLM request 1 s old (2.0 on its 500 ms target) vs 4 embeddings (target 50 ms each).
        queue, instances = _mixed_case(
            make_request, make_view, emb_arrival=10.0 - emb_age_ms / 1000, llm_arrival=9.0, n_llm=1
        )
        policy = make_policy("hybrid", embedding_priority="adaptive")
        decisions = policy.schedule(10.0, queue, instances)
        by_id = {r.id: r for r in queue}
        by_age[emb_age_ms] = (_first_type(decisions, by_id), policy.last_pressure)
        emb_hints = {d.priority_hint for d in decisions if by_id[d.request_ids[0]].is_embedding}
        assert emb_hints == ({0} if by_age[emb_age_ms][0] == "embedding" else {2})
    assert by_age[5.0][0] == "llm" and by_age[5.0][1]["embedding"] == pytest.approx(0.4)
    assert by_age[200.0][0] == "embedding" and by_age[200.0][1]["embedding"] == pytest.approx(16.0)


def test_adaptive_pressure_counts_queue_size(make_request, make_view):
    policy = make_policy("hybrid", embedding_priority="adaptive")
    one = [emb(make_request, "e0", arrival_s=0.0)]
    many = [emb(make_request, f"e{i}", arrival_s=0.0) for i in range(10)]
    assert policy.pressure(0.05, many) == pytest.approx(10 * policy.pressure(0.05, one))


# -- LLM fallback ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback", LLM_FALLBACK_POLICIES)
def test_every_fallback_places_llm_work_under_the_ratio(fallback, make_request, make_view, check_decisions):
    instances = [make_view("gpu", "llm", max_inflight=3), make_view("mix", "llm_embedding", max_inflight=10)]
    queue = [make_request(f"c{i}", arrival_s=i / 100, priority=i % 5, ttft_ms=5000.0) for i in range(15)]
    queue += [emb(make_request, f"e{i}", inputs=8) for i in range(8)]
    policy = make_policy("hybrid", llm_fallback_policy=fallback, llm_holdback_ms=0)
    decisions = policy.schedule(1.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    by_id = {r.id: r for r in queue}
    llm_rules = {d.rule for d in assignments(decisions) if not by_id[d.request_ids[0]].is_embedding}
    assert llm_rules == {f"hybrid/llm/{fallback}"}
    assert slots_by_type(decisions, by_id, "gpu") == (3, 0)
    assert slots_by_type(decisions, by_id, "mix") == (7, 3)
    # 3 on gpu, 7 LLM on mix, and one batch of 3 embeddings (a full 4-request batch cut to the 3 free
    # embedding slots); the other 5 LLM requests and 5 embeddings wait.
    assert not rejected and len(assigned) == 3 + 7 + 3
    for d in assignments(decisions):
        assert d.priority_hint is not None and d.reason


def test_priority_fallback_orders_llm_by_class(make_request, make_view):
    instances = [make_view("gpu", "llm", max_inflight=1)]
    queue = [
        make_request("old-low", priority="low", arrival_s=0.0),
        make_request("new-high", priority="high", arrival_s=0.5),
    ]
    (d,) = make_policy("hybrid", llm_fallback_policy="priority").schedule(1.0, queue, instances)
    assert d.request_ids == ("new-high",)
    fifo = make_policy("hybrid", llm_fallback_policy="fifo")
    (d,) = fifo.schedule(1.0, queue, instances)  # fifo: arrival order; priority is only a hint
    assert d.request_ids == ("old-low",) and d.priority_hint == 3


def test_fallback_sees_this_calls_embedding_load(make_request, make_view):
    # Two mixed instances, no preference: embeddings claim first and land on m1 (lower id on a tie);
    # the fallback must see that load and put the LLM request on m2.
    instances = [make_view("m1", "llm_embedding"), make_view("m2", "llm_embedding")]
    queue = [emb(make_request, "e0", inputs=32, tokens=3000), make_request("c", arrival_s=0.5)]
    decisions = make_policy("hybrid", embedding_priority="high").schedule(0.9, queue, instances)
    placed = {i: d.instance_id for d in assignments(decisions) for i in d.request_ids}
    assert placed == {"e0": "m1", "c": "m2"}


def test_shed_by_llm_only_pass_is_not_final_while_a_mixed_instance_could_serve(make_request, make_view):
    # The LLM-only instance is hopelessly slow for this SLO; the mixed one is fast.
    instances = [
        make_view("slow", "llm", prefill_tokens_per_s=10.0),
        make_view("fast", "llm_embedding", prefill_tokens_per_s=1e6),
    ]
    queue = [make_request("c", prompt_tokens=1000, max_tokens=1, ttft_ms=100.0)]
    policy = make_policy("hybrid", llm_fallback_policy="slo_aware", llm_fallback_config={"shed_unattainable": True})
    (d,) = policy.schedule(0.0, queue, instances)
    assert isinstance(d, Assignment) and d.instance_id == "fast"


# -- the seed's traps: keyed by id, nothing dropped ------------------------------------------------


def test_every_request_is_decided_or_held_never_dropped(make_request, make_view, check_decisions):
    instances = [make_view("tei", "embedding", models=("E",)), make_view("gpu", "llm", models=("L",))]
    queue = [
        make_request("chat", model="L"),
        make_request("nobody", model="X"),
        emb(make_request, "held", model="E", arrival_s=0.999),
        emb(make_request, "gone", model="E", arrival_s=0.0),
        make_request("wrong-kind", "embedding", model="L", inputs=1, prompt_tokens=5),
    ]
    policy = HybridPolicy()
    decisions = policy.schedule(1.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert set(assigned) == {"chat", "gone", "held"}  # the expired window takes 'held' along
    assert set(rejected) == {"nobody", "wrong-kind"}
    assert all(d.code == RejectCode.NO_COMPATIBLE_INSTANCE for d in decisions if isinstance(d, Rejection))


def test_unhealthy_instances_hold_rather_than_reject(make_request, make_view):
    instances = [make_view("tei", "embedding", healthy=False)]
    policy = HybridPolicy()
    assert policy.schedule(1.0, [emb(make_request, "e", arrival_s=0.0)], instances) == []


def test_decisions_are_keyed_by_id_not_queue_order(make_request, make_view):
    instances = [make_view("mix", "llm_embedding", max_inflight=6), make_view("tei", "embedding", max_inflight=2)]
    queue = [make_request(f"c{i}", arrival_s=i / 10) for i in range(6)]
    queue += [emb(make_request, f"e{i}", inputs=5, arrival_s=i / 100) for i in range(9)]
    a = HybridPolicy().schedule(1.0, queue, instances)
    b = HybridPolicy().schedule(1.0, list(reversed(queue)), instances)
    assert a == b


# -- property: batch bounds on random embedding queues ----------------------------------------------

emb_specs = st.lists(
    st.tuples(
        st.sampled_from(["A", "B"]),
        st.integers(1, 48),  # inputs
        st.integers(1, 6000),  # tokens
        st.integers(0, 4),  # priority
        st.floats(0.0, 0.05).map(lambda x: round(x, 4)),  # arrival
    ),
    max_size=40,
)
view_specs = st.lists(
    st.tuples(
        st.sampled_from(["embedding", "llm_embedding"]),
        st.integers(4, 64),  # max_client_batch_size
        st.integers(1, 12),  # max_inflight
        st.integers(0, 4),  # running (LLM)
        st.sets(st.sampled_from(["A", "B"]), min_size=1),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=emb_specs,
    views=view_specs,
    batch=st.integers(1, 40),
    budget=st.integers(500, 20_000),
    min_size=st.integers(1, 8),
    ratio=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    prefer=st.booleans(),
    now=st.sampled_from([0.051, 0.055, 0.07]),
    n_llm=st.integers(0, 5),
)
def test_batches_respect_every_bound(
    specs, views, batch, budget, min_size, ratio, prefer, now, n_llm, make_request, make_view, check_decisions
):
    queue = [
        emb(make_request, f"e{k}", inputs=n, tokens=t, model=m, priority=p, arrival_s=a)
        for k, (m, n, t, p, a) in enumerate(specs)
    ]
    queue += [make_request(f"c{k}", model="A", arrival_s=0.0) for k in range(n_llm)]
    instances = [
        make_view(f"i{k}", kind, models=models, max_client_batch_size=mcbs, max_inflight=cap, running=run)
        for k, (kind, mcbs, cap, run, models) in enumerate(views)
    ]
    policy = make_policy(
        "hybrid",
        embedding_batch_size=max(batch, min_size),
        embedding_batch_token_budget=budget,
        min_embedding_batch_size=min_size,
        hybrid_instance_ratio=ratio,
        prefer_specialized_instances=prefer,
        embedding_holdback_ms=0,  # the window property below; holdback has its own test
    )
    decisions = policy.schedule(now, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)  # includes: no id twice, capacity
    by_id = {r.id: r for r in queue}
    views_by_id = {v.id: v for v in instances}
    for d in assignments(decisions):
        texts, tokens, models = batch_stats(d, by_id)
        if by_id[d.request_ids[0]].is_embedding:
            assert len(models) == 1
            assert texts <= views_by_id[d.instance_id].max_client_batch_size
            if d.is_batch:
                assert texts <= max(batch, min_size) and tokens <= budget
            else:
                assert d.rule in (RULE_OVERSIZE, RULE_FULL, RULE_EXPIRED, RULE_IDLE)
    for r in queue:  # only what no instance can take is rejected, and only for a stated reason
        if r.id in rejected and r.is_embedding and any(v.can_serve(r) for v in instances):
            assert r.embedding_inputs > max(v.max_client_batch_size for v in instances if v.can_serve(r))
    # The window: every embedding held at `now` >= arrival + 10 ms is held only for lack of capacity.
    held = [r for r in queue if r.is_embedding and r.id not in assigned and r.id not in rejected]
    for r in held:
        if now - r.arrival_s >= WINDOW_S:
            free = [
                v
                for v in instances
                if v.can_serve(r)
                and v.max_client_batch_size >= r.embedding_inputs
                and v.inflight + sum(len(d.request_ids) for d in assignments(decisions) if d.instance_id == v.id)
                < v.max_inflight
            ]
            mixed_capped = [v for v in free if v.kind.value == "llm_embedding"]
            assert len(free) == len(mixed_capped), f"{r.id} expired yet held with free specialized capacity"


def test_an_oversized_neighbour_does_not_make_a_batch_full(make_request, make_view):
    # 'big' goes alone at once; 'small' is a partial batch of one and waits for company.
    queue = [emb(make_request, "small", arrival_s=0.0), emb(make_request, "big", inputs=40, arrival_s=0.001)]
    policy = make_policy("hybrid", release_when_idle=False)
    decisions = policy.schedule(0.002, queue, [make_view("tei", "embedding", max_client_batch_size=64)])
    assert [(d.request_ids, d.rule) for d in decisions] == [(("big",), RULE_OVERSIZE)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(st.floats(0.0, 0.2).map(lambda x: round(x, 4)), min_size=1, max_size=60),
    inputs=st.data(),
    window_ms=st.sampled_from([0.0, 2.0, 10.0, 25.0]),
)
def test_a_driver_following_next_wakeup_meets_every_window(arrivals, inputs, window_ms, make_request, make_view):
    """With ample capacity, a driver that calls at arrivals and at `next_wakeup` dispatches every
    embedding no later than its arrival plus the window: the wake-up contract is enough."""
    queue = [
        emb(make_request, f"e{k}", inputs=inputs.draw(st.integers(1, 12)), arrival_s=t) for k, t in enumerate(arrivals)
    ]
    instances = [make_view("tei", "embedding", max_inflight=10_000)]
    policy = make_policy("hybrid", max_embedding_wait_ms=window_ms)
    dispatched: dict[str, float] = {}
    now = min(arrivals)
    for _ in range(10 * len(queue) + 10):
        pending = [r for r in queue if r.arrival_s <= now and r.id not in dispatched]
        for d in policy.schedule(now, pending, instances):
            assert isinstance(d, Assignment)
            dispatched.update(dict.fromkeys(d.request_ids, now))
        later = [r.arrival_s for r in queue if r.arrival_s > now]
        wake = policy.next_wakeup(now)
        if wake is not None:
            assert wake > now
            later.append(wake)
        if not later:
            break
        now = min(later)
    assert set(dispatched) == {r.id for r in queue}
    for r in queue:
        assert dispatched[r.id] - r.arrival_s <= window_ms / 1000 + 1e-9


def test_a_batch_cut_below_min_on_the_preferred_instance_tries_the_next(make_request, make_view):
    instances = [
        make_view("tei", "embedding", max_inflight=3, running=2, embedding_inflight=2),  # 1 slot
        make_view("mix", "llm_embedding"),
    ]
    queue = [emb(make_request, f"e{i}", inputs=4) for i in range(8)]  # one full batch of 32 texts
    policy = make_policy("hybrid", min_embedding_batch_size=8)
    (d,) = policy.schedule(0.001, queue, instances)
    assert d.instance_id == "mix" and d.rule == RULE_FULL and len(d.request_ids) == 8


# -- the defaults an operator gets ------------------------------------------------------------------


def test_idle_release_by_default_and_the_window_only_while_busy(make_request, make_view):
    queue = [emb(make_request, "e0", arrival_s=0.0)]
    (d,) = HybridPolicy().schedule(0.0, queue, [make_view("tei", "embedding")])
    assert d.rule == RULE_IDLE and d.request_ids == ("e0",)  # an idle engine: no reason to wait
    busy = [make_view("tei", "embedding", running=1, embedding_inflight=1)]
    policy = HybridPolicy()
    assert policy.schedule(0.0, queue, busy) == []  # a busy engine: wait for company...
    assert policy.next_wakeup(0.0) == pytest.approx(WINDOW_S)
    (d,) = policy.schedule(WINDOW_S, queue, busy)  # ...at most the window
    assert d.rule == RULE_EXPIRED
    # A mixed GPU busy with LLM work only has an idle embedding side: released at once.
    mixed = [make_view("mix", "llm_embedding", running=8, queued_decode_tokens=2000)]
    (d,) = HybridPolicy().schedule(0.0, queue, mixed)
    assert d.rule == RULE_IDLE and d.instance_id == "mix"


def test_adaptive_fallback_honours_llm_priority_under_congestion(make_request, make_view):
    # One slot free of five (load 0.8): the adaptive fallback is in priority mode, so the high-priority
    # request passes the older low-priority one; a calm cluster keeps arrival order.
    queue = [
        make_request("old-low", priority="low", arrival_s=0.0),
        make_request("new-high", priority="high", arrival_s=0.5),
    ]
    congested = [make_view("gpu", "llm", max_inflight=5, running=4)]
    (d,) = HybridPolicy(llm_fallback_policy="adaptive").schedule(1.0, queue, congested)
    assert d.request_ids == ("new-high",) and d.priority_hint == 1
    assert d.rule == "hybrid/llm/adaptive" and "adaptive/priority" in d.reason
    calm = [make_view("gpu", "llm", max_inflight=64)]
    decisions = HybridPolicy(llm_fallback_policy="adaptive").schedule(1.0, queue, calm)
    assert [x.request_ids for x in decisions] == [("old-low",), ("new-high",)]
    assert [x.priority_hint for x in decisions] == [3, 1]  # priority still reaches the backend


class _Recorder:
    """Wraps a fallback policy and keeps the instance lists it was shown."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[list] = []

    def schedule(self, now, queue, instances):
        self.seen.append(list(instances))
        return self.inner.schedule(now, queue, instances)


def test_fallback_sees_untouched_views_until_this_call_places_or_a_share_applies(make_request, make_view):
    llm = make_view("llm", "llm", ("m",), running=1, max_inflight=4)
    mixed = make_view("mix", "llm_embedding", ("m", "e"), running=2, embedding_inflight=1, max_inflight=10)
    policy = make_policy("hybrid", hybrid_instance_ratio=0.5, max_embedding_wait_ms=1000.0, release_when_idle=False)
    policy.llm_fallback = _Recorder(policy.llm_fallback)

    # Only LLM work queued: every LLM-capable instance is shown as it is (no copy, nothing to fold in).
    queue = [make_request(f"c{i}", "chat", "m", arrival_s=0.001 * i) for i in range(3)]
    decisions = policy.schedule(1.0, queue, [llm, mixed])
    shown = policy.llm_fallback.seen[-1]
    assert shown[0] is llm and shown[1] is mixed
    assert len(assignments(decisions)) == 3

    # Embeddings wait for the mixed instance: its LLM share is cut to floor(0.5 * 10) = 5 slots, of
    # which 1 is used (2 in flight, 1 of them an embedding).
    queue = [make_request(f"c{i}", "chat", "m", arrival_s=0.001 * i) for i in range(9)]
    queue.append(make_request("e0", "embedding", "e", arrival_s=0.999))
    policy.schedule(1.0, queue, [llm, mixed])
    shown_mixed = policy.llm_fallback.seen[-1][1]
    assert shown_mixed is not mixed and shown_mixed.id == "mix"
    assert shown_mixed.max_inflight == shown_mixed.inflight + 4


def test_load_aware_placement_keeps_the_contract_and_spreads_within_one_call(make_request, make_view, check_decisions):
    # Equal GPUs: twenty chats in one call split evenly (the ledger counts this call's placements),
    # ties going to the LLM-only instance; the old rule sent all twenty to the LLM-only GPU.
    instances = [make_view("gpu", "llm", max_inflight=64), make_view("mix", "llm_embedding", max_inflight=64)]
    queue = [make_request(f"c{i}", arrival_s=i / 100, prompt_tokens=100, max_tokens=100) for i in range(20)]
    decisions = HybridPolicy(llm_holdback_ms=0).schedule(1.0, queue, instances)
    check_decisions(decisions, queue, instances)
    by_id = {r.id: r for r in queue}
    assert slots_by_type(decisions, by_id, "gpu") == (10, 0) and slots_by_type(decisions, by_id, "mix") == (10, 0)
    assert decisions[0].instance_id == "gpu"
