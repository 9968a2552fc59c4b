"""Cluster entries with `url:`: one config for both drivers."""

from __future__ import annotations

import pytest

from sagesched.replay.cluster import backend_configs, block_tokens, sim_cluster_dict
from sagesched.sim.config import ClusterConfig

CLUSTER = {
    "instances": [
        {"id": "llm", "count": 2, "kind": "llm", "model": "llama-2-7b", "url": ["http://127.0.0.1:1", "http://127.0.0.1:2"],
         "vllm": {"max_num_seqs": 8, "prefix_hash_block_tokens": 16}},
        {"id": "mixed", "kind": "llm_embedding", "model": "llama-2-7b", "embedding_model": "bge-base",
         "url": "http://127.0.0.1:3", "api_key": "k", "backend": {"decode_step_s": 0.05}},
        {"id": "tei", "kind": "embedding", "embedding_model": "bge-base", "url": "http://127.0.0.1:4/v1", "api": "tei"},
    ]
}  # fmt: skip


def test_entries_become_backends_and_the_simulator_ignores_the_live_keys():
    backends = backend_configs(CLUSTER)
    assert [b.id for b in backends] == ["llm-0", "llm-1", "mixed", "tei"]
    assert [b.url for b in backends] == [f"http://127.0.0.1:{i}" for i in (1, 2, 3, 4)]
    assert backends[0].max_num_seqs == 8 and backends[0].models == ("llama-2-7b",)
    assert backends[2].models == ("llama-2-7b", "bge-base") and backends[2].api_key == "k"
    assert backends[2].decode_step_s == 0.05 and backends[3].api == "tei"
    sim = ClusterConfig.from_dict(sim_cluster_dict(CLUSTER))
    assert [i.id for i in sim.instances] == ["llm-0", "llm-1", "mixed", "tei"]
    assert block_tokens(CLUSTER) == 16


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "a", "kind": "llm", "model": "m"}, "has no `url:`"),
        ({"id": "a", "count": 2, "kind": "llm", "model": "m", "url": "http://127.0.0.1:1"}, "list of 2 URLs"),
        ({"id": "a", "kind": "llm", "model": "m", "url": "ftp://x"}, "must look like"),
        ({"id": "a", "kind": "llm", "model": "m", "url": "http://127.0.0.1:1", "backend": {"colour": 1}}, "colour"),
    ],
)
def test_bad_entries_name_the_instance_and_the_fix(entry, message):
    with pytest.raises(ValueError, match=message):
        backend_configs({"instances": [entry]})


@pytest.mark.parametrize(
    "entry, path",
    [
        ({"id": "a", "kind": "llm", "model": "m"}, "cluster.instances[1].url"),
        (
            {"id": "a", "kind": "llm", "model": "m", "url": "http://127.0.0.1:1", "backend": {"colour": 1}},
            "cluster.instances[1].backend.colour",
        ),
        (
            {"id": "a", "kind": "llm", "model": "m", "url": "http://127.0.0.1:1", "max_inflight": "many"},
            "cluster.instances[1].max_inflight",
        ),
        (
            {"id": "a", "kind": "llm", "model": "m", "url": "http://127.0.0.1:1", "vllm": {"max_num_seqs": "x"}},
            "cluster.instances[1].vllm.max_num_seqs",
        ),
        (
            {"id": "a", "count": "two", "kind": "llm", "model": "m", "url": ["http://127.0.0.1:1"]},
            "cluster.instances[1].count",
        ),
    ],
)
def test_live_entry_errors_carry_the_override_path(entry, path):
    """A bad live key is located like a simulator key: the Hydra override to fix, not a bare message."""
    from sagesched.typed_config import ConfigFieldError

    good = {"id": "ok", "kind": "llm", "model": "m", "url": "http://127.0.0.1:2"}
    with pytest.raises(ConfigFieldError) as info:
        backend_configs({"instances": [good, entry]})
    assert str(info.value).startswith(path + ":"), str(info.value)
