"""Driver-side state of one simulated instance: its engine cores, the segment in flight, counters.

The cluster driver (`sagesched.sim.cluster`) keeps one per configured instance; the engine segments
(`sagesched.sim.segments`) move it forward and the snapshots (`Simulator._view`) read it. Holds
no behaviour beyond a few derived flags: the engines are the pure state machines in
`sagesched.sim.engines`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import simpy

from sagesched.core import InstanceKind, InstanceView
from sagesched.sim.config import InstanceConfig
from sagesched.sim.engines import DecodeRun, SharedGpu, StepPlan, TeiBatch, TeiEngineCore, VllmEngineCore
from sagesched.sim.engines.llamacpp_instance import LlamaCppInstanceCore
from sagesched.sim.engines.tei import embedding_engine_config
from sagesched.sim.views import DEFAULT_VIEW


def _unbound(_event: simpy.Event) -> None:
    raise RuntimeError("an engine segment ended on an instance no simulator has bound its callbacks to")


class InstanceState:
    """Driver-side state of one instance: its engine cores, the segment in flight, counters."""

    def __init__(self, cfg: InstanceConfig, llm_perf: Any, emb_perf: Any) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.kind = cfg.kind
        self.models = cfg.models
        self.max_inflight = cfg.max_inflight
        self.llm: VllmEngineCore | None = None
        if llm_perf is not None and cfg.engine == "llamacpp":
            # Duck-typed: it answers every call the driver makes of a VllmEngineCore (see its module).
            self.llm = cast(VllmEngineCore, LlamaCppInstanceCore(llm_perf))
        elif llm_perf is not None:
            self.llm = VllmEngineCore(cfg.vllm, llm_perf)
        # TEI, or a vLLM pooling engine (`shared.embedding_backend: vllm`): the same core, its knobs.
        emb_cfg = embedding_engine_config(
            cfg, getattr(getattr(emb_perf, "model", None), "max_position_embeddings", None)
        )
        self.tei = TeiEngineCore(emb_cfg, emb_perf) if emb_perf is not None else None
        if self.kind is InstanceKind.LLM_EMBEDDING and (self.llm is None or self.tei is None):
            raise ValueError(
                f"instance {cfg.id}: an llm_embedding instance needs both an LLM and an embedding performance model "
                "(the perf provider returned none for one of them)"
            )
        self.gpu = SharedGpu(cfg.shared) if (self.llm is not None and self.tei is not None) else None
        self.inflight = 0
        self.emb_inflight = 0
        self.tei_requests = 0
        self.seqs: dict[str, Any] = {}  # request id -> engine Seq (for preemption/cache counts at completion)
        # The vLLM segment in flight: a planned step or a decode run, started at llm_t0.
        self.llm_plan: StepPlan | None = None
        self.llm_run: DecodeRun | None = None
        self.index = 0  # position in the simulator's instance list (and its views)
        self.llm_t0 = 0.0
        # The engines' end-of-segment callbacks (`functools.partial` over this instance), built once by
        # the driver rather than once per segment.
        self.llm_done_cb: Callable[[simpy.Event], None] = _unbound
        self.tei_done_cb: Callable[[simpy.Event], None] = _unbound
        self.llm_event: simpy.Event | None = None  # the end event of the LLM segment in flight (step or run)
        self.tei_batch: TeiBatch | None = None
        # Utilisation: time with at least one engine busy.
        self.busy_since: float | None = None
        self.busy_acc = 0.0
        self.sample_busy = 0.0
        self.sample_t = 0.0
        self.sample_quiet: tuple | None = None  # (version, row) when idle at the last timeline sample
        # Bumped by every change of the instance's state (dispatch, segment start/end); a decode run
        # in flight changes only its step count m. Snapshots are cached by (version, m), and the
        # part of a snapshot that m does not change by version alone (see `Simulator._view`).
        self.version = 0
        self.cached_view: tuple | None = None  # (version, m, view)
        self.cached_load: tuple | None = None
        # KV blocks of the vLLM engine (1 without one: never divided by then).
        self.kv_blocks = self.llm.kv.num_blocks if self.llm is not None else 1
        if self.llm is not None:
            self.prefill_rate = float(llm_perf.prefill_tokens_per_s)
            self.decode_step = float(llm_perf.decode_step_s)
            if cfg.engine == "llamacpp":  # slots and the token batch of llama-server
                self.max_num_seqs = llm_perf.config.n_parallel
                self.max_batch_tokens = llm_perf.config.n_batch
            else:
                self.max_num_seqs = cfg.vllm.max_num_seqs
                self.max_batch_tokens = cfg.vllm.max_num_batched_tokens
        else:
            self.prefill_rate = float(emb_perf.tokens_per_s)
            self.decode_step = DEFAULT_VIEW.decode_step_s
            self.max_num_seqs = emb_cfg.max_concurrent_requests
            self.max_batch_tokens = emb_cfg.max_batch_tokens
        self.emb_rate = float(emb_perf.tokens_per_s) if emb_perf is not None else self.prefill_rate
        self.max_client_batch = (
            emb_cfg.max_client_batch_size if self.tei is not None else DEFAULT_VIEW.max_client_batch_size
        )
        # The constant part of this instance's snapshots (validated once by the constructor).
        template = InstanceView(
            id=self.id,
            kind=self.kind,
            models=self.models,
            healthy=True,
            max_inflight=self.max_inflight,
            max_num_seqs=self.max_num_seqs,
            max_batch_tokens=self.max_batch_tokens,
            max_client_batch_size=self.max_client_batch,
            prefill_tokens_per_s=self.prefill_rate,
            decode_step_s=self.decode_step,
            embedding_tokens_per_s=self.emb_rate,
            age_s=0.0,
            max_embedding_inputs=emb_cfg.max_concurrent_requests if self.tei is not None else 0,
        )
        self.static_view = tuple(getattr(template, f) for f in InstanceView.__slots__)

    @property
    def llm_active(self) -> bool:
        return self.llm_plan is not None or self.llm_run is not None

    def busy_total(self, now: float) -> float:
        return self.busy_acc + (now - self.busy_since if self.busy_since is not None else 0.0)
