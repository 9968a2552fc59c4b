"""Bad values in what a user writes (cluster configs, policy knobs, the gateway file, `sagesched calibrate`
arguments): an error that names the field and the fix, never a traceback, a crash mid-run or a silent
acceptance of nonsense."""

from __future__ import annotations

import math
import socket

import pytest
from hydra import compose, initialize_config_dir

from sagesched.core import InstanceKind
from sagesched.experiment import conf_dir, run
from sagesched.live.gateway_config import GatewayConfigError, parse_gateway_config
from sagesched.policies import make_policy
from sagesched.sim.config import ClusterConfig, InstanceConfig
from sagesched.sim.perf_provider import default_perf_provider
from sagesched.typed_config import ConfigFieldError

BACKEND = 'backends:\n  - {url: "http://127.0.0.1:8001", kind: llm, models: [m]}\n'


def _compose(*overrides: str):
    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        return compose(config_name="config", overrides=["workload.duration_s=2", "sim.progress=false", *overrides])


# -- cluster configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llm_weight", "embedding_weight"])
def test_an_infinite_shared_gpu_weight_is_refused_by_name(name):
    # It was accepted, then a ZeroDivisionError (inf / inf) when the simulator built the instance.
    entry = {"id": "g", "kind": "llm_embedding", "embedding_model": "bge-base", "shared": {name: math.inf}}
    with pytest.raises(ConfigFieldError) as info:
        ClusterConfig.from_dict({"instances": [entry]})
    assert info.value.path == ("cluster", "instances", 0, "shared", name)
    assert "finite number > 0" in info.value.message


def test_tensor_parallel_below_one_is_a_config_error():
    with pytest.raises(ConfigFieldError) as info:
        ClusterConfig.from_dict({"instances": [{"id": "a", "tensor_parallel": 0}]})
    assert info.value.path == ("cluster", "instances", 0, "tensor_parallel")
    assert "must be >= 1" in info.value.message


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"hardware": "tpu"}, "hardware 'tpu': no such hardware profile; use one of a100, h100"),
        ({"model": "llama-9"}, "model 'llama-9': no such LLM profile; use one of"),
        (
            {"kind": "embedding", "embedding_model": "bert-nope"},
            "embedding_model 'bert-nope': no such embedding model profile; use one of",
        ),
        ({"tensor_parallel": 3}, "tensor_parallel 3: tensor_parallel=3 is not valid for llama-2-7b"),
    ],
)
def test_unknown_profile_names_name_the_instance_and_field(fields, text):
    cfg = InstanceConfig(id="inst", **fields)
    with pytest.raises(ValueError) as info:
        default_perf_provider(cfg)
    message = str(info.value)
    assert message.startswith(f"cluster instance 'inst', {text}"), message
    assert "in the cluster config" in message


@pytest.mark.parametrize(
    ("content", "problem"), [(b"scale: .nan\n", "scale is nan"), (b"scale: .inf\n", "scale is inf")]
)
def test_a_non_finite_calibration_coefficient_is_refused(tmp_path, content, problem):
    # NaN ran to the end with NaN latencies; inf made the policy fail requests mid-run.
    path = tmp_path / "cal.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        default_perf_provider(InstanceConfig(id="a", calibration=str(path)))
    message = str(info.value)
    assert f"calibration '{path}': {problem}; a coefficient must be a finite number" in message
    assert "model.calibration=" in message


def test_a_binary_calibration_file_is_named(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_bytes(b"\x00\x01\xff")
    with pytest.raises(ValueError) as info:
        default_perf_provider(InstanceConfig(id="a", calibration=str(path)))
    assert str(info.value).startswith(f"cluster instance 'a', calibration '{path}': 'utf-8' codec")


def test_calibration_none_runs_a_cluster_with_embedding_engines(tmp_path):
    # Documented as "skip the default calibration"; the embedding engines read it as a file named none.
    summary = run(_compose("workload=poisson", "model.calibration=none"), tmp_path)
    assert summary["completed"] == summary["requests"] > 0
    llm, emb = default_perf_provider(
        InstanceConfig(id="m", kind=InstanceKind.LLM_EMBEDDING, embedding_model="bge-base", calibration="none")
    )
    assert llm is not None and emb is not None and emb.calibration.scale == 1.0


def test_an_unknown_hardware_through_the_experiment_names_the_override(tmp_path):
    with pytest.raises(ValueError, match=r"hardware 'tpu'.*model\.hardware="):
        run(_compose("workload=poisson", "model.hardware=tpu"), tmp_path)


# -- policy knobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knob",
    [
        "max_embedding_wait_ms",
        "embedding_aging_ms",
        "embedding_target_wait_ms",
        "llm_target_wait_ms",
        "colocated_embedding_slowdown",
        "embedding_holdback_ms",
        "llm_holdback_ms",
    ],
)
def test_hybrid_refuses_infinite_times_and_factors(knob):
    # max_embedding_wait_ms=inf (release_when_idle=false) overflowed the wake-up time: requests failed.
    with pytest.raises(ConfigFieldError) as info:
        make_policy("hybrid", **{knob: math.inf})
    assert info.value.path == (knob,)
    assert "finite" in info.value.message


def test_the_infinite_batching_window_is_refused_at_the_override(tmp_path):
    with pytest.raises(ConfigFieldError) as info:
        run(_compose("policy.release_when_idle=false", "policy.max_embedding_wait_ms=inf"), tmp_path)
    assert str(info.value).startswith("policy.max_embedding_wait_ms: ")


@pytest.mark.parametrize(
    ("overrides", "path", "text"),
    [
        ({"llm_fallback_config": {"max_shed_fraction": 2}}, ("max_shed_fraction",), "must be within [0, 1]"),
        ({"llm_fallback_config": {"max_shed_fraction": "x"}}, ("max_shed_fraction",), "must be a number"),
        ({"llm_fallback_config": {"bogus": 1}}, ("bogus",), "unknown llm_fallback_config key(s) 'bogus'"),
        (
            {"llm_fallback_policy": "fair_share", "llm_fallback_config": {"tenant_weights": {"a": 0}}},
            ("tenant_weights", "a"),
            "must be a finite number > 0",
        ),
        (
            {"admission": False, "llm_fallback_config": {"ttft_margin_factor": 1.2}},
            ("ttft_margin_factor",),
            "needs admission=true",
        ),
    ],
)
def test_fallback_config_errors_name_llm_fallback_config(overrides, path, text):
    # They were located at `policy.<key>`, a key hybrid does not have.
    with pytest.raises(ConfigFieldError) as info:
        make_policy("hybrid", **overrides)
    assert info.value.path == ("llm_fallback_config", *path)
    assert text in info.value.message


def test_hybrid_keeps_its_admission_default_for_the_fallback():
    policy = make_policy("hybrid", llm_fallback_config={"ttft_margin_factor": 1.2})
    assert policy.llm_fallback.config.ttft_margin_factor == 1.2


@pytest.mark.parametrize(("knob", "value"), [("embedding_priority", "urgent"), ("llm_fallback_policy", "hybrid")])
def test_hybrid_choices_are_located_at_their_field(knob, value):
    with pytest.raises(ConfigFieldError) as info:
        make_policy("hybrid", **{knob: value})
    assert info.value.path == (knob,)
    assert "use one of" in info.value.message


@pytest.mark.parametrize(
    ("knob", "value", "text"),
    [
        ("min_dwell_s", math.nan, "min_dwell_s must be a finite number >= 0"),
        ("slack_threshold_s", math.nan, "slack_threshold_s must be a finite number"),
        ("aging_interval_s", 0.0, "aging_interval_s must be > 0"),
        ("urgent_max_priority", 9, "priority 9 out of range"),
    ],
)
def test_adaptive_knobs_are_checked_by_name(knob, value, text):
    # NaN was accepted silently; aging_interval_s / urgent_max_priority failed only when the
    # sub-policy was built, not located at the field.
    with pytest.raises(ConfigFieldError) as info:
        make_policy("adaptive", **{knob: value})
    assert info.value.path == (knob,)
    assert text in info.value.message


@pytest.mark.parametrize("policy", ["priority", "adaptive"])
def test_urgent_max_priority_takes_a_name_as_documented(policy):
    assert make_policy(policy, urgent_max_priority="high").config.urgent_max_priority == 1
    with pytest.raises(ConfigFieldError) as info:
        make_policy(policy, urgent_max_priority=True)
    assert info.value.path == ("urgent_max_priority",)
    assert "0-4 or a priority name" in info.value.message


@pytest.mark.parametrize("policy", ["fair_share", "slo_aware"])
def test_tenant_weights_must_be_finite(policy):
    with pytest.raises(ConfigFieldError) as info:
        make_policy(policy, tenant_weights={"a": math.inf})
    assert info.value.path == ("tenant_weights", "a")
    assert "finite number > 0" in info.value.message


# -- the gateway file -----------------------------------------------------------------------------------


def test_a_key_written_twice_is_an_error_with_both_lines():
    with pytest.raises(GatewayConfigError, match=r"^g\.yaml line 4: port: duplicate key \(also on line 3\)"):
        parse_gateway_config(BACKEND + "port: 8100\nport: 8200\n", source="g.yaml")
    with pytest.raises(GatewayConfigError, match=r"line 5: policy\.name: duplicate key \(also on line 4\)"):
        parse_gateway_config(BACKEND + "policy:\n  name: fifo\n  name: hybrid\n", source="g.yaml")


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("http://127.0.0.1:99999", "has no valid host:port (port 1-65535)"),
        ("http://127.0.0.1:abc", "has no valid host:port"),
        ("http://127.0.0.1:0", "has no valid host:port"),
        ("http://exa mple:8001", "has no valid host:port"),
        ("http://127.0.0.1:8001?x=1", "without ?query or #fragment"),
    ],
)
def test_a_malformed_backend_url_is_named(url, text):
    with pytest.raises(GatewayConfigError) as info:
        parse_gateway_config(f'backends:\n  - {{url: "{url}", kind: llm, models: [m]}}\n', source="g.yaml")
    assert str(info.value).startswith(f"g.yaml line 2: backends[0].url: {url!r}"), str(info.value)
    assert text in str(info.value) and "http://127.0.0.1:8001" in str(info.value)


@pytest.mark.parametrize(
    "second",
    [
        '{url: "HTTP://127.0.0.1:8001", kind: llm, models: [m]}',
        '{id: "127.0.0.1:8001", url: "http://127.0.0.1:8002", kind: llm, models: [m]}',
    ],
)
def test_backends_sharing_the_executors_id_are_refused_in_the_file(second):
    # Both passed the file's check, then the executor refused them when the gateway started.
    with pytest.raises(GatewayConfigError, match=r"^g\.yaml line 3: backends\[1\]: duplicate backend"):
        parse_gateway_config(BACKEND + f"  - {second}\n", source="g.yaml")


def test_fallback_config_error_in_the_gateway_file_names_the_key():
    text = BACKEND + "policy:\n  name: hybrid\n  llm_fallback_config: {max_shed_fraction: 2}\n"
    with pytest.raises(GatewayConfigError, match=r"line 5: policy\.llm_fallback_config\.max_shed_fraction: "):
        parse_gateway_config(text, source="g.yaml")


@pytest.mark.parametrize(
    ("value", "hint"),
    [("1e-3", "write 1.0e-3"), ('"2"', "write the number without quotes")],
)
def test_a_number_read_as_text_says_why(value, hint):
    # PyYAML reads 1e-3 as a string: "must be a number, got '1e-3'" left the user puzzled.
    with pytest.raises(GatewayConfigError) as info:
        parse_gateway_config(BACKEND + f"health_interval_s: {value}\n", source="g.yaml")
    assert "health_interval_s: must be a number" in str(info.value) and hint in str(info.value)


# -- sagesched calibrate ----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_calibrate_runs_names_a_missing_folder(tmp_path, capsys):
    from sagesched.calibrate.cli import main

    assert main(["runs", str(tmp_path / "none"), "--out", str(tmp_path / "c.yaml")]) == 2
    assert "none is not a folder; pass an inference-perf run folder" in capsys.readouterr().err


def test_calibrate_llamacpp_checks_its_arguments(tmp_path, capsys):
    from sagesched.calibrate.cli import main

    out = str(tmp_path / "c.yaml")
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["llamacpp", url, "--model", "m", "--parallel", "0", "--out", out]) == 2
    assert "n_parallel must be >= 1, got 0; pass the server's own settings (--parallel" in capsys.readouterr().err
    assert main(["llamacpp", "notaurl", "--model", "m", "--out", out]) == 2
    assert "'notaurl' is not an http(s) URL" in capsys.readouterr().err
    assert main(["llamacpp", url, "--model", "m", "--out", out]) == 1
    assert f"check that llama-server runs at {url}" in capsys.readouterr().err


def test_calibrate_probe_checks_the_profile_before_probing(tmp_path, capsys):
    from sagesched.calibrate.cli import main

    out = str(tmp_path / "c.yaml")
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["probe", url, "--model", "m", "--hardware", "tpu", "--out", out]) == 2
    assert "unknown hardware 'tpu'" in capsys.readouterr().err
    assert main(["probe", url, "--model", "m", "--out", out]) == 1
    assert f"{url}: ConnectError" in capsys.readouterr().err
