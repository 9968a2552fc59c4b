"""The `driver` config group: which driver runs an experiment, and how the live one behaves.

`driver=sim` (the default) simulates; `driver=live` replays the same workload through the live
executor with the same policy against the cluster's `url:`s; `driver=endpoint` replays it against
one external URL with no policy of ours in between. Every field is documented in conf/driver/.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagesched.typed_config import ConfigFieldError, Path, from_mapping, parse_with, plain

DRIVERS = ("sim", "live")
MODES = ("policy", "endpoint")


def _executor_knobs(value: Any) -> dict[str, Any]:
    """`driver.executor`: ExecutorConfig fields, checked now (names and types) so a typo fails before the run."""
    from sagesched.live.executor_config import ExecutorConfig

    knobs = dict(plain(value) or {})
    from_mapping(ExecutorConfig, knobs, "executor")
    return knobs


def _check_url(url: str) -> None:
    """`driver.endpoint.url` must be http(s)://HOST[:PORT][/v1], checked before the workload is built."""
    from sagesched.live.backends import base_url_problem

    if problem := base_url_problem(url):
        raise ConfigFieldError(("endpoint", "url"), f"{problem}; e.g. driver.endpoint.url=http://127.0.0.1:9000")


@dataclass(frozen=True)
class EndpointConfig:
    """The one external server of `mode: endpoint`.

    url: base URL of an OpenAI-compatible server (e.g. our gateway: http://127.0.0.1:9000).
    api_key: bearer token, if the server needs one.
    """

    url: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class PromptConfig:
    """How prompts with the requested token counts are built (sagesched.replay.prompts).

    calibrate: probe the server's token counts (`usage.prompt_tokens`) before the run.
    tokenize: use the server's `/tokenize`, where it has one, to keep only single-token words.
    block_tokens: tokens per prefix-hash block; None = the cluster's `vllm.prefix_hash_block_tokens`.
    seed: varies the generated text (not its length).
    """

    calibrate: bool = True
    tokenize: bool = True
    block_tokens: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class DriverConfig:
    """One experiment's driver.

    name: "sim" or "live".
    mode (live): "policy" (our executor and policy over the cluster's `url:`s) or "endpoint".
    stream: stream LLM answers (TTFT is measured at the first chunk with content).
    ignore_eos / min_tokens: force the output length: `max_tokens` is always the workload's output
        length; `ignore_eos: true` (vLLM, llama-server) and `min_tokens` (vLLM) stop it ending early.
    start_delay_s: the first arrival is this long after the backends answered their health probe.
    request_timeout_s: a request unfinished this long after its intended arrival fails (504).
    drain_timeout_s: after the last send, how long in-flight requests may take before they fail.
    timeline_interval_s: seconds between samples of each instance's load (0 = no timeline).
    progress: a progress bar over finished requests.
    executor: LiveExecutor knobs (sagesched.live.executor.ExecutorConfig) to override.
    """

    name: str = "sim"
    mode: str = "policy"
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    stream: bool = True
    ignore_eos: bool = True
    min_tokens: bool = False
    prompts: PromptConfig = field(default_factory=PromptConfig)
    start_delay_s: float = 0.5
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 300.0
    timeline_interval_s: float = 1.0
    progress: bool = True
    executor: dict[str, Any] = field(default_factory=dict, metadata=parse_with(_executor_knobs))

    def __post_init__(self) -> None:
        if self.name not in DRIVERS:
            raise ConfigFieldError(("name",), f"{self.name!r}: use driver=sim or driver=live (or driver=endpoint)")
        if self.mode not in MODES:
            raise ConfigFieldError(("mode",), f"{self.mode!r}: use 'policy' or 'endpoint'")
        if self.name == "live" and self.mode == "endpoint" and not self.endpoint.url:
            raise ConfigFieldError(
                ("endpoint", "url"),
                "driver.mode=endpoint needs driver.endpoint.url=http://HOST:PORT (the server to measure)",
            )
        if self.endpoint.url:
            _check_url(self.endpoint.url)
        for name in ("request_timeout_s", "drain_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigFieldError((name,), f"must be a finite number > 0, got {getattr(self, name)}")
        for name in ("start_delay_s", "timeline_interval_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigFieldError((name,), f"must be a finite number >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, root: Path = ("driver",)) -> DriverConfig:
        """Build from the `driver` config group; errors name the override to fix (``driver.stream``)."""
        return from_mapping(cls, data or {}, root=root)
