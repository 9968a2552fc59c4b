"""One `engine: llamacpp` cluster entry drives both drivers: the simulator's llama.cpp instance and the
live driver's backend, which starts from the same slots, batch and calibrated rates."""

from __future__ import annotations

import pytest

from sagesched.replay.cluster import backend_configs, block_tokens, sim_cluster_dict
from sagesched.sim.config import ClusterConfig
from sagesched.sim.engines.llamacpp_instance import load_llamacpp_perf
from sagesched.typed_config import ConfigFieldError

CLUSTER = {
    "instances": [
        {"id": "llm", "count": 2, "kind": "llm", "model": "gemma-3-270m", "engine": "llamacpp",
         "url": ["http://127.0.0.1:1", "http://127.0.0.1:2"], "max_inflight": 4,
         "llamacpp": {"calibration": "gemma-3-270m-q4km-xeon-2cpu-t1", "n_parallel": 2, "prefix_block_tokens": 32}},
        {"id": "emb", "kind": "embedding", "embedding_model": "gemma-embed", "engine": "llamacpp",
         "url": "http://127.0.0.1:3", "backend": {"max_inflight": 8},
         "llamacpp": {"calibration": "gemma-3-270m-q4km-xeon-2cpu-t1-embedding", "n_parallel": 1}},
    ]
}  # fmt: skip


def test_the_same_entry_gives_the_simulator_and_the_live_driver_the_same_server():
    sim = ClusterConfig.from_dict(sim_cluster_dict(CLUSTER))
    llm, emb = load_llamacpp_perf(sim.instances[0]), load_llamacpp_perf(sim.instances[2])
    backends = backend_configs(CLUSTER)
    assert [b.id for b in backends] == ["llm-0", "llm-1", "emb"]
    b = backends[0]
    assert (b.max_num_seqs, b.max_batch_tokens, b.max_inflight) == (2, 2048, 4)
    assert b.prefill_tokens_per_s == llm.prefill_tokens_per_s and b.decode_step_s == llm.decode_step_s
    e = backends[2]
    assert (e.max_num_seqs, e.max_inflight) == (1, 8) and e.embedding_tokens_per_s == emb.tokens_per_s
    assert block_tokens(CLUSTER) == 32


def test_a_bad_llamacpp_entry_is_refused_at_its_field_for_live_use_too():
    bad = {"instances": [{**CLUSTER["instances"][0], "llamacpp": {"calibration": "nope", "n_parallel": 2}}]}
    with pytest.raises(ConfigFieldError, match=r"cluster\.instances\[0\]\.llamacpp\.calibration.*no such file"):
        backend_configs(bad)


def test_prefix_hash_blocks_mean_the_same_tokens_in_the_simulator_the_live_prompts_and_the_bounds():
    """The hash granularity belongs to the workload: 512 tokens unless the entry says otherwise."""
    from sagesched.sim.engines.llamacpp_instance import engine_config, load_llamacpp_calibration, prefix_block_tokens

    entry = {**CLUSTER["instances"][0], "llamacpp": {"calibration": "gemma-3-270m-q4km-xeon-2cpu-t1"}}
    cluster = {"instances": [entry]}
    inst = ClusterConfig.from_dict(sim_cluster_dict(cluster)).instances[0]
    cfg = engine_config(inst.llamacpp, False, load_llamacpp_calibration("gemma-3-270m-q4km-xeon-2cpu-t1"))
    assert block_tokens(cluster) == 512 == cfg.prefix_block_tokens == prefix_block_tokens(inst.llamacpp)
    assert block_tokens(CLUSTER) == 32  # an entry that says so
