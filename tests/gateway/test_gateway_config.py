"""The gateway YAML file: valid files load, invalid ones are refused naming the line and the fix."""

from __future__ import annotations

import pytest

from sagesched.live.gateway_config import GatewayConfig, GatewayConfigError, load_gateway_config, parse_gateway_config

MINIMAL = """\
policy: hybrid
backends:
  - {url: "http://127.0.0.1:8001", kind: llm, models: [llama-2-7b]}
  - {url: "http://127.0.0.1:8090", kind: embedding, models: [bge-base]}
"""


def test_minimal_file_loads_with_safe_defaults(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL)
    config = load_gateway_config(path)
    assert config.policy == "hybrid" and config.policy_config == {}
    assert [b.kind for b in config.backends] == ["llm", "embedding"]
    assert config.backends[1].models == ("bge-base",)
    assert config.host == "127.0.0.1"  # never exposed unless asked
    assert config.port == 8000 and config.workers == 1
    assert config.api_keys == () and config.admin_key is None
    assert config.make_policy().name == "hybrid"
    backend = config.backends[0].to_backend_config()
    assert backend.url == "http://127.0.0.1:8001"


def test_policy_mapping_and_server_knobs():
    config = parse_gateway_config(
        """\
policy: {name: fifo, head_of_line_blocking: true}
backends:
  - url: http://127.0.0.1:8001
    kind: llm_embedding
    models: m
    max_inflight: 8
host: 127.0.0.1
port: 9001
api_keys: [k1, k2]
admin_key: adm
max_queue: 5
request_timeout_s: 2.5
"""
    )
    assert config.policy == "fifo" and config.policy_config == {"head_of_line_blocking": True}
    assert config.make_policy().config.head_of_line_blocking is True
    assert config.backends[0].max_inflight == 8 and config.backends[0].models == ("m",)
    assert (config.port, config.api_keys, config.admin_key, config.max_queue) == (9001, ("k1", "k2"), "adm", 5)
    assert config.request_timeout_s == 2.5
    assert config.url == "http://127.0.0.1:9001"


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("GW_TEST_KEY", "secret-1")
    config = parse_gateway_config(MINIMAL + "api_keys: ['${GW_TEST_KEY}']\n")
    assert config.api_keys == ("secret-1",)
    with pytest.raises(GatewayConfigError, match=r"line 5: api_keys: environment variable GW_TEST_MISSING is not set"):
        parse_gateway_config(MINIMAL + "api_keys: ['${GW_TEST_MISSING}']\n")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            MINIMAL.replace("kind: embedding", "kind: gpu"),
            r"g\.yaml line 4: backends\[1\]\.kind: unknown instance kind 'gpu'; use one of llm, embedding, llm_embedding",
        ),
        (
            MINIMAL.replace("policy: hybrid", "policy: hybird"),
            r"line 1: policy: unknown policy 'hybird'; available: .*hybrid",
        ),
        (MINIMAL + "prot: 8000\n", r"line 5: prot: unknown key 'prot'; valid keys: .*port"),
        (MINIMAL + "port: 70000\n", r"line 5: port: 70000 is out of range; use a number between 0 and 65535"),
        (MINIMAL + "port: eighty\n", r"line 5: port: must be a whole number"),
        (
            MINIMAL.replace('"http://127.0.0.1:8090"', "127.0.0.1:8090"),
            r"line 4: backends\[1\]\.url: .* is not an http\(s\) URL",
        ),
        (
            MINIMAL.replace("models: [bge-base]", "models: []"),
            r"line 4: backends\[1\]\.models: must be a non-empty list",
        ),
        ("policy: hybrid\n", r"line 1: backends: missing; add `backends:`"),
        ("policy: hybrid\nbackends: [\n", r"g\.yaml line \d: invalid YAML"),
        ("", r"the file is empty"),
        (MINIMAL + "host: example.com\n", r"line 5: host: 'example.com' is not an IP address"),
        (
            "policy:\n  name: fifo\n  batch: 3\nbackends:\n  - {url: 'http://127.0.0.1:1', kind: llm, models: [m]}\n",
            r"line 3: policy\.batch: invalid config for policy 'fifo': unknown config key 'batch'; "
            r"valid keys: head_of_line_blocking",
        ),
        (
            "policy:\n  name: hybrid\n  embedding_batch_size: lots\nbackends:\n"
            "  - {url: 'http://127.0.0.1:1', kind: llm, models: [m]}\n",
            r"line 3: policy\.embedding_batch_size: invalid config for policy 'hybrid': must be a whole number",
        ),
        (
            MINIMAL + "  - {url: 'http://127.0.0.1:8001', kind: llm, models: [x]}\n",
            r"line 5: backends\[2\]: duplicate backend 'http://127.0.0.1:8001'",
        ),
    ],
)
def test_invalid_files_name_line_and_fix(text, pattern):
    with pytest.raises(GatewayConfigError, match=pattern):
        parse_gateway_config(text, source="g.yaml")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(GatewayConfigError, match="not found; pass an existing file with --config"):
        load_gateway_config(tmp_path / "nope.yaml")


def test_from_dict_and_overrides():
    config = GatewayConfig.from_dict(
        {"policy": "fifo", "backends": [{"url": "http://127.0.0.1:1", "kind": "llm", "models": ["m"]}]}
    )
    changed = config.with_overrides(port=0, host=None)
    assert changed.port == 0 and changed.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ("executor: {max_queue: lots}\n", r"line 5: executor\.max_queue: must be a whole number, got 'lots'"),
        ("executor:\n  max_records: 0\n", r"line 6: executor\.max_records: max_records must be >= 1"),
        ("executor: {bogus: 1}\n", r"line 5: executor\.bogus: unknown executor key 'bogus'; valid keys: .*max_queue"),
    ],
)
def test_executor_section_is_typed_with_lines(extra, pattern):
    with pytest.raises(GatewayConfigError, match=pattern):
        parse_gateway_config(MINIMAL + extra, source="g.yaml")


def test_backend_extra_fields_are_typed_with_lines():
    text = MINIMAL.replace("models: [bge-base]", "models: [bge-base], max_client_batch_size: many")
    with pytest.raises(
        GatewayConfigError, match=r"line 4: backends\[1\]\.max_client_batch_size: must be a whole number, got 'many'"
    ):
        parse_gateway_config(text, source="g.yaml")
