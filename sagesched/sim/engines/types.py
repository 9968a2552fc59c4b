"""Plain data passed into and out of the engine cores (no SimPy, no wall clock).

The cores are state machines that both the SimPy simulator and the wall-clock emulators drive, so
everything they exchange is a small dataclass: what enters (`EngineRequest`), what one step or
batch produced (`StepOutcome`) and how a backend refuses work (`EngineRejected`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineRequest:
    """One unit of work as an engine sees it.

    For a vLLM engine one `EngineRequest` is one sequence: `prompt_tokens` to prefill, then
    `output_tokens` to generate (the simulator knows the true output length; a real engine stops at
    `max_tokens` or EOS). `pooling=True` marks an embedding request served by a vLLM engine: it is
    prefill-only and finishes when its prompt is computed. `priority` (smaller = more urgent) only
    matters in vLLM's priority scheduling mode. `prefix_hashes` are the prompt's prefix-block hashes
    (one per `prefix_hash_block_tokens` tokens, Mooncake's `hash_ids`).

    For a TEI engine one `EngineRequest` is one HTTP call: `input_tokens` holds the token count of
    each input (several requests merged into one call contribute all their inputs) and
    `num_requests` says how many gateway requests the call carries.
    """

    id: str
    prompt_tokens: int = 0
    output_tokens: int = 1
    max_tokens: int = 0
    priority: int = 2
    pooling: bool = False
    prefix_hashes: tuple[int, ...] = ()
    input_tokens: tuple[int, ...] = ()
    num_requests: int = 1


@dataclass(slots=True, init=False)
class StepOutcome:
    """What one engine step (or a jump over several pure-decode steps) produced.

    `emitted` maps request id to the number of output tokens it produced; `first_token_ids` got
    their first token in this step; `finished_ids` are done (their KV blocks are already freed);
    `preempted_ids` were preempted by recompute when this step was planned. Built at the end of
    every engine segment, so its ``__init__`` is written out: the dataclass one called a factory
    per field (~0.07 us more a segment).
    """

    emitted: dict[str, int]
    first_token_ids: list[str]
    finished_ids: list[str]
    preempted_ids: list[str]
    steps: int

    def __init__(
        self,
        emitted: dict[str, int] | None = None,
        first_token_ids: list[str] | None = None,
        finished_ids: list[str] | None = None,
        preempted_ids: list[str] | None = None,
        steps: int = 1,
    ) -> None:
        self.emitted = {} if emitted is None else emitted
        self.first_token_ids = [] if first_token_ids is None else first_token_ids
        self.finished_ids = [] if finished_ids is None else finished_ids
        self.preempted_ids = [] if preempted_ids is None else preempted_ids
        self.steps = steps


class EngineRejected(Exception):
    """The backend refused the call outright, as an HTTP status would (429 queue full, 413 too large, 400)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
