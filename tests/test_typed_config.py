"""One typed config layer: every config family reports a wrong key, a wrong type or a bad value the same way.

Each error is a `ConfigFieldError` (a ValueError) whose `path` is the field's path from the config's
root: the Hydra override to fix for experiment configs, a line number in the gateway file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hydra import compose, initialize_config_dir

from sagesched.experiment import conf_dir, run
from sagesched.live.backends import BackendConfig
from sagesched.live.executor_config import ExecutorConfig
from sagesched.live.gateway_config import GatewayConfig, GatewayConfigError, parse_gateway_config
from sagesched.replay.config import DriverConfig
from sagesched.sim.config import ClusterConfig, InstanceConfig, SimConfig, VllmEngineConfig
from sagesched.sim.workloads import WorkloadConfig
from sagesched.typed_config import ConfigFieldError, describe, from_mapping, parse_with

# -- the layer itself ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inner:
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class _Outer:
    name: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()
    limit: int | None = None
    inner: _Inner = field(default_factory=_Inner)
    items: tuple[_Inner, ...] = ()
    upper: str = field(default="A", metadata=parse_with(lambda v: v.upper() if isinstance(v, str) else v))


def test_yaml_conveniences_over_strict_types():
    built = from_mapping(_Outer, {"name": "x", "weight": 2, "tags": ["a"], "limit": 1e3, "upper": "b"})
    assert built.weight == 2.0 and isinstance(built.weight, float)
    assert built.tags == ("a",) and built.limit == 1000 and isinstance(built.limit, int)
    assert built.upper == "B"
    assert from_mapping(_Outer, {"name": "x", "items": [{"size": 2}, {}]}).items == (_Inner(2), _Inner(1))


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"name": "x", "wieght": 1}, ("root", "wieght"), "unknown key 'wieght'; valid keys: inner, items, limit"),
        ({"name": 5}, ("root", "name"), "must be a string, got 5"),
        ({"name": "x", "weight": "1"}, ("root", "weight"), "must be a number, got '1'"),
        ({"name": "x", "limit": True}, ("root", "limit"), "must be a whole number or null, got True"),
        ({"name": "x", "limit": 2.5}, ("root", "limit"), "must be a whole number or null, got 2.5"),
        ({"name": "x", "tags": "a"}, ("root", "tags"), "must be a list of strings, got 'a'"),
        ({"name": "x", "inner": {"size": 0}}, ("root", "inner", "size"), "size must be >= 1, got 0"),
        ({"name": "x", "inner": {"sise": 0}}, ("root", "inner", "sise"), "unknown key 'sise'"),
        ({"name": "x", "items": [{}, {"size": "2"}]}, ("root", "items", 1, "size"), "must be a whole number"),
        ({"name": "x", "inner": 3}, ("root", "inner"), "must be a mapping of _Inner fields"),
        ({}, ("root", "name"), "missing; _Outer needs name"),
    ],
)
def test_errors_carry_the_field_path(data, path, message):
    with pytest.raises(ConfigFieldError) as info:
        from_mapping(_Outer, data, root=("root",))
    assert info.value.path == path
    assert message in info.value.message
    assert str(info.value).startswith("root")


def test_types_in_words():
    assert describe(int | None) == "a whole number or null"
    assert describe(dict[str, float]) == "a mapping of strings to numbers"
    assert describe(tuple[str, ...]) == "a list of strings"


def test_omegaconf_nodes_are_read_like_dicts():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"mode": "step", "timeline_interval_s": "${oc.decode:'0.5'}"})
    assert SimConfig.from_dict(node) == SimConfig(mode="step", timeline_interval_s=0.5)


# -- every family: a wrong key and a wrong type, by path ---------------------------------------------------


@pytest.mark.parametrize(
    ("build", "data", "text"),
    [
        (SimConfig.from_dict, {"speed": 2}, "sim.speed: unknown key 'speed'; valid keys: max_time_s, mode"),
        (SimConfig.from_dict, {"progress": "no"}, "sim.progress: must be true or false, got 'no'"),
        (SimConfig.from_dict, {"mode": "fast"}, "sim.mode: 'fast': use 'jump' (fast) or 'step' (reference)"),
        (
            ClusterConfig.from_dict,
            {"instances": [{"id": "a"}, {"id": "b", "vllm": {"max_num_seq": 3}}]},
            "cluster.instances[1].vllm.max_num_seq: unknown key 'max_num_seq'; valid keys: async_scheduling",
        ),
        (
            ClusterConfig.from_dict,
            {"instances": [{"id": "a", "tei": {"max_batch_tokens": "16k"}}]},
            "cluster.instances[0].tei.max_batch_tokens: must be a whole number, got '16k'",
        ),
        (
            ClusterConfig.from_dict,
            {"instances": [{"id": "a", "shared": {"overlap": 2}}]},
            "cluster.instances[0].shared.overlap: must be in [0, 1], got 2.0",
        ),
        (
            ClusterConfig.from_dict,
            {"instances": [{"id": "a", "kind": "gpu"}]},
            "cluster.instances[0].kind: unknown instance kind 'gpu'; use one of llm, embedding, llm_embedding",
        ),
        (
            ClusterConfig.from_dict,
            {"instances": [{"id": "a", "count": "2"}]},
            "cluster.instances[0].count: must be a whole number >= 1, got '2'",
        ),
        (VllmEngineConfig.from_dict, {"block_size": 0}, "vllm.block_size: must be >= 1, got 0"),
        (
            WorkloadConfig.from_dict,
            {"arrival": {"rate": 3}},
            "workload.arrival.rate: unknown key 'rate'; valid keys: burst_off_s",
        ),
        (WorkloadConfig.from_dict, {"duration_s": "1h"}, "workload.duration_s: must be a number or null, got '1h'"),
        (DriverConfig.from_dict, {"strem": True}, "driver.strem: unknown key 'strem'; valid keys: drain_timeout_s"),
        (DriverConfig.from_dict, {"prompts": {"seed": "a"}}, "driver.prompts.seed: must be a whole number, got 'a'"),
        (
            DriverConfig.from_dict,
            {"executor": {"max_queue": "9"}},
            "driver.executor.max_queue: must be a whole number, got '9'",
        ),
        (ExecutorConfig.from_dict, {"max_queu": 1}, "max_queu: unknown executor key 'max_queu'; valid keys:"),
        (ExecutorConfig.from_dict, {"scrape_metrics": 1}, "scrape_metrics: must be true or false, got 1"),
        (
            BackendConfig.from_dict,
            {"url": "http://127.0.0.1:1", "kind": "llm", "models": ["m"], "max_inflight": "8"},
            "max_inflight: must be a whole number, got '8'",
        ),
        (
            lambda d: GatewayConfig.from_dict(d, source="gw"),
            {"backends": [{"url": "http://127.0.0.1:1", "kind": "llm", "models": ["m"]}], "prot": 1},
            "gw: prot: unknown key 'prot'; valid keys: admin_key",
        ),
    ],
)
def test_each_family_names_the_field(build, data, text):
    with pytest.raises(ValueError) as info:
        build(data)
    assert str(info.value).startswith(text), str(info.value)


def test_hardware_defaults_still_fill_vllm_budgets():
    h100 = InstanceConfig.from_dict({"id": "a", "hardware": "h100", "vllm": {"block_size": 32}})
    assert (h100.vllm.max_num_batched_tokens, h100.vllm.max_num_seqs, h100.vllm.block_size) == (8192, 1024, 32)
    own = InstanceConfig.from_dict({"id": "a", "hardware": "h100", "vllm": {"max_num_seqs": 8}})
    assert (own.vllm.max_num_batched_tokens, own.vllm.max_num_seqs) == (8192, 8)
    counted = ClusterConfig.from_dict({"instances": [{"id": "g", "hardware": "h100", "count": 2}]})
    assert [i.id for i in counted.instances] == ["g-0", "g-1"]
    assert all(i.vllm.max_num_batched_tokens == 8192 for i in counted.instances)


def test_gateway_file_gives_the_line_of_a_wrong_type():
    text = (
        "policy: fifo\n"
        "backends:\n"
        "  - url: http://127.0.0.1:8001\n"
        "    kind: llm\n"
        "    models: [m]\n"
        "    decode_step_s: fast\n"
        "workers: two\n"
    )
    with pytest.raises(GatewayConfigError, match=r"^g\.yaml line 6: backends\[0\]\.decode_step_s: must be a number"):
        parse_gateway_config(text, source="g.yaml")
    with pytest.raises(GatewayConfigError, match=r"^g\.yaml line 6: workers: must be a whole number, got 'two'"):
        parse_gateway_config(text.replace("    decode_step_s: fast\n", ""), source="g.yaml")


# -- Hydra: the error names the override to fix -------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("sim.mode=fast", "sim.mode: 'fast'"),
        ("workload.rate_scale=fast", "workload.rate_scale: must be a number, got 'fast'"),
        ("+workload.arrival.rate=3", "workload.arrival.rate: unknown key 'rate'"),
        (
            "+cluster.instances.0.vllm.max_num_seqs=many",
            "cluster.instances[0].vllm.max_num_seqs: must be a whole number",
        ),
        ("+driver.stream=maybe", "driver.stream: must be true or false, got 'maybe'"),
    ],
)
def test_hydra_overrides_are_named_in_errors(tmp_path, override, text):
    with pytest.raises(ConfigFieldError) as info:
        run(_compose("workload.duration_s=5", "sim.progress=false", override), tmp_path)
    assert str(info.value).startswith(text), str(info.value)


def test_emulator_options_are_typed_too():
    from sagesched.live.emulators.runner import build_app

    with pytest.raises(ConfigFieldError, match=r"^time_scale: must be a number, got 'x'"):
        build_app("vllm", time_scale="x")
    with pytest.raises(ConfigFieldError, match=r"^tei\.max_batch_token: unknown key 'max_batch_token'"):
        build_app("tei", max_batch_token=3)
