"""Instance views for the simulator's policy calls, built fast.

A policy call needs one `InstanceView` per instance, on every call, in both modes; the dataclass
constructor (keywords, frozen setattr, `__post_init__`) costs more than the rest of a view's
computation. So views are built from the instance's constant fields (validated once by the real
constructor) plus its load, filling the slots directly. Kept apart from the cluster driver: this is
a layout trick about `InstanceView`, not about simulation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sagesched.core import InstanceKind, InstanceView


def _slot_setter(name: str):
    return getattr(InstanceView, name).__set__


DEFAULT_VIEW = InstanceView(id="_", kind=InstanceKind.LLM, models=frozenset({"_"}))
_new_instance = object.__new__
_ALL_SETTERS = tuple(_slot_setter(f) for f in InstanceView.__slots__)
_set_running = _slot_setter("running")
_set_waiting = _slot_setter("waiting")
_set_embedding_inflight = _slot_setter("embedding_inflight")
_set_kv_usage = _slot_setter("kv_usage")
_set_queued_prefill = _slot_setter("queued_prefill_tokens")
_set_queued_decode = _slot_setter("queued_decode_tokens")
_set_queued_embedding = _slot_setter("queued_embedding_tokens")
_set_embedding_inputs = _slot_setter("embedding_inputs_inflight")

# The slot order `_make_view_direct` is written for; `make_view` falls back to the generic
# version if `InstanceView` ever changes its fields.
_VIEW_LAYOUT = (
    "id",
    "kind",
    "models",
    "healthy",
    "running",
    "waiting",
    "embedding_inflight",
    "kv_usage",
    "queued_prefill_tokens",
    "queued_decode_tokens",
    "max_inflight",
    "max_num_seqs",
    "max_batch_tokens",
    "max_client_batch_size",
    "prefill_tokens_per_s",
    "decode_step_s",
    "embedding_tokens_per_s",
    "age_s",
    "queued_embedding_tokens",
    "embedding_inputs_inflight",
    "max_embedding_inputs",
)


def _make_view_generic(
    static: tuple,
    running: int,
    waiting: int,
    emb_inflight: int,
    kv: float,
    prefill: int,
    decode: int,
    emb_tokens: int = 0,
    emb_inputs: int = 0,
) -> InstanceView:
    """`make_view` for any `InstanceView` layout: copy the template, then set the load fields."""
    view = _new_instance(InstanceView)
    for setter, value in zip(_ALL_SETTERS, static, strict=True):
        setter(view, value)
    _set_running(view, running)
    _set_waiting(view, waiting)
    _set_embedding_inflight(view, emb_inflight)
    _set_kv_usage(view, kv)
    _set_queued_prefill(view, prefill)
    _set_queued_decode(view, decode)
    _set_queued_embedding(view, emb_tokens)
    _set_embedding_inputs(view, emb_inputs)
    return view


class _ViewBuilder:
    """A plain (writable) class with `InstanceView`'s slot layout, for `_make_view_direct`.

    A view is filled in as a `_ViewBuilder`, with ordinary attribute stores, then becomes an
    `InstanceView` by assigning `__class__` (Python allows it between classes with the same slots),
    frozen from then on: about a third of the cost of calling each slot's setter.
    """

    __slots__ = _VIEW_LAYOUT
    # InstanceView's fields, for the type checker (the slots above are what exists at run time).
    id: str
    kind: InstanceKind
    models: frozenset[str]
    healthy: bool
    running: int
    waiting: int
    embedding_inflight: int
    kv_usage: float
    queued_prefill_tokens: int
    queued_decode_tokens: int
    max_inflight: int
    max_num_seqs: int
    max_batch_tokens: int
    max_client_batch_size: int
    prefill_tokens_per_s: float
    decode_step_s: float
    embedding_tokens_per_s: float
    age_s: float
    queued_embedding_tokens: int
    embedding_inputs_inflight: int
    max_embedding_inputs: int


def _make_view_direct(
    static: tuple,
    running: int,
    waiting: int,
    emb_inflight: int,
    kv: float,
    prefill: int,
    decode: int,
    emb_tokens: int = 0,
    emb_inputs: int = 0,
) -> InstanceView:
    """`make_view` for the `_VIEW_LAYOUT` slot order (see `_ViewBuilder`)."""
    (
        id_,
        kind,
        models,
        healthy,
        _running,
        _waiting,
        _emb_inflight,
        _kv,
        _prefill,
        _decode,
        max_inflight,
        max_num_seqs,
        max_batch_tokens,
        max_client_batch_size,
        prefill_tokens_per_s,
        decode_step_s,
        embedding_tokens_per_s,
        age_s,
        _emb_tokens,
        _emb_inputs,
        max_embedding_inputs,
    ) = static
    view = _ViewBuilder()
    view.id = id_
    view.kind = kind
    view.models = models
    view.healthy = healthy
    view.running = running
    view.waiting = waiting
    view.embedding_inflight = emb_inflight
    view.kv_usage = kv
    view.queued_prefill_tokens = prefill
    view.queued_decode_tokens = decode
    view.max_inflight = max_inflight
    view.max_num_seqs = max_num_seqs
    view.max_batch_tokens = max_batch_tokens
    view.max_client_batch_size = max_client_batch_size
    view.prefill_tokens_per_s = prefill_tokens_per_s
    view.decode_step_s = decode_step_s
    view.embedding_tokens_per_s = embedding_tokens_per_s
    view.age_s = age_s
    view.queued_embedding_tokens = emb_tokens
    view.embedding_inputs_inflight = emb_inputs
    view.max_embedding_inputs = max_embedding_inputs
    # The layout trick the type checker cannot follow: from here on `view` is an InstanceView.
    view.__class__ = InstanceView  # type: ignore[assignment]
    return view  # type: ignore[return-value]


def _direct_views_work() -> bool:
    """Whether `_make_view_direct` builds exactly the view the constructor builds (same layout)."""
    if InstanceView.__slots__ != _VIEW_LAYOUT:
        return False
    static = tuple(getattr(DEFAULT_VIEW, f) for f in _VIEW_LAYOUT)
    try:
        view = _make_view_direct(static, 1, 2, 1, 0.5, 3, 4, 2, 5)
    except TypeError:  # __class__ assignment refused: the layouts differ
        return False
    expected = dataclasses.replace(
        DEFAULT_VIEW,
        running=1,
        waiting=2,
        embedding_inflight=1,
        kv_usage=0.5,
        queued_prefill_tokens=3,
        queued_decode_tokens=4,
        queued_embedding_tokens=2,
        embedding_inputs_inflight=5,
    )
    return type(view) is InstanceView and view == expected


# A snapshot from the instance's constant fields (`static`, in slot order) and its load. Hot path:
# a policy call needs one view per instance in both modes (so this caps the jump mode's speed-up),
# and the dataclass constructor (keyword arguments, frozen setattr, __post_init__) costs more than
# the rest of a view's computation, so the slots are filled directly (the constant values were
# validated once by the real constructor). The generic version is the fallback should
# `InstanceView`'s fields ever change.
make_view = _make_view_direct if _direct_views_work() else _make_view_generic


STATIC_SLOT = {name: i for i, name in enumerate(InstanceView.__slots__)}


def uniform_llm_rates(instances: Sequence[Any]) -> dict[str, tuple[float, float]]:
    """`InstancePool.uniform_llm` for the simulator's instances (`InstanceState`, fixed `static_view`).

    Per model, the (prefill_tokens_per_s, decode_step_s) that every instance able to serve the
    model's LLM requests shares; a model whose instances differ is left out. The simulator's
    instances are always healthy and their rates never change, which is what lets a policy call
    an idle one the fastest place for new LLM work (hybrid's load rule, `hybrid_llm`).
    """
    slot = STATIC_SLOT
    pairs: dict[str, set[tuple[float, float]]] = {}
    for inst in instances:
        static = inst.static_view
        if not static[slot["healthy"]]:
            return {}
        if static[slot["kind"]] is InstanceKind.EMBEDDING:
            continue
        pair = (static[slot["prefill_tokens_per_s"]], static[slot["decode_step_s"]])
        for model in static[slot["models"]]:
            pairs.setdefault(model, set()).add(pair)
    return {model: next(iter(found)) for model, found in pairs.items() if len(found) == 1}
