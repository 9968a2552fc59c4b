"""One cluster config for both drivers: an instance entry may name its live server with `url:`.

The simulator reads an entry's engine fields (hardware, vllm.*, tei.*, ...) and ignores the live
ones; the live driver turns each entry into a `BackendConfig` for the executor. Live-only keys:

url: the server's base URL (a list of URLs for an entry with `count: N`, one per instance).
api: "openai" (default) or "tei" (TEI's native /embed).
api_key: bearer token for the server.
scrape_metrics: read the server's /metrics load gauges (default true).
backend: further `BackendConfig` fields (e.g. {prefill_tokens_per_s: 400, decode_step_s: 0.05}).

A cluster meant only for live use may give just `id`, `kind`, `url` and the model names.

An entry with `engine: llamacpp` (a llama-server) gives the live driver what the simulator reads from
its `llamacpp:` section: slots (`n_parallel`) as `max_num_seqs`, `n_batch` as `max_batch_tokens`, and
the calibration's prefill rate and decode step time (embedding rate for an `--embeddings` server) as
the executor's initial throughput estimates, so that the policy starts from the same view of the
server in both drivers (`backend:` still overrides any of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LIVE_KEYS = frozenset({"url", "api", "api_key", "scrape_metrics", "backend"})


def _entries(cluster: Mapping[str, Any]) -> list[dict[str, Any]]:
    entries = cluster.get("instances") if isinstance(cluster, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError("the cluster config needs `instances:`, a non-empty list of instance entries")
    return [dict(e) for e in entries]


def sim_cluster_dict(cluster: Mapping[str, Any]) -> dict[str, Any]:
    """The cluster config without the live-only keys, for `ClusterConfig.from_dict`."""
    out = dict(cluster)
    out["instances"] = [{k: v for k, v in e.items() if k not in LIVE_KEYS} for e in _entries(cluster)]
    return out


#: BackendConfig fields that come from an entry's engine sections: (section, key in the entry).
_ENGINE_FIELDS = {
    "max_num_seqs": ("vllm", "max_num_seqs"),
    "max_batch_tokens": ("vllm", "max_num_batched_tokens"),
    "max_client_batch_size": ("tei", "max_client_batch_size"),
}
_ENTRY_FIELDS = ("max_inflight", "api", "api_key", "scrape_metrics")


def backend_configs(cluster: Mapping[str, Any]) -> list[Any]:
    """One `BackendConfig` per instance (entries with `count: N` expand to `<id>-0..N-1`).

    Errors are `ConfigFieldError`s located at the entry's own key (``cluster.instances[1].url``,
    ``cluster.instances[0].backend.colour``), the Hydra override to fix, like the simulator's.
    """
    from sagesched.live.backends import BackendConfig
    from sagesched.typed_config import ConfigFieldError

    out: list[BackendConfig] = []
    for i, entry in enumerate(_entries(cluster)):
        at: tuple[str | int, ...] = ("cluster", "instances", i)
        ident = str(entry.get("id") or "instance")
        count = entry.get("count")
        urls = entry.get("url")
        if urls is None:
            raise ConfigFieldError(
                (*at, "url"),
                f"instance {ident!r} has no `url:`; driver=live needs each instance's server, e.g. "
                "`url: http://127.0.0.1:8000` (conf/cluster/emulators.yaml shows one), or use driver=sim",
            )
        n = 1 if count is None else count
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigFieldError((*at, "count"), f"must be a whole number >= 1, got {count!r}")
        if isinstance(urls, str):
            urls = [urls] * n if n == 1 else None
        if not isinstance(urls, list) or len(urls) != n:
            raise ConfigFieldError(
                (*at, "url"), f"instance {ident!r} has count {n}: give `url:` as a list of {n} URLs, one each"
            )
        ids = [ident] if count is None else [f"{ident}-{k}" for k in range(n)]
        kind = str(entry.get("kind", "llm"))
        models = [entry["model"]] if kind != "embedding" and entry.get("model") else []
        if kind != "llm" and entry.get("embedding_model"):
            models.append(entry["embedding_model"])
        sections = {"vllm": entry.get("vllm") or {}, "tei": entry.get("tei") or {}}
        llamacpp = _llamacpp_fields(entry, at) if entry.get("engine") == "llamacpp" else {}
        extra = entry.get("backend") or {}
        if not isinstance(extra, Mapping):
            raise ConfigFieldError((*at, "backend"), f"must be a mapping of BackendConfig fields, got {extra!r}")
        for k, (iid, url) in enumerate(zip(ids, urls, strict=True)):
            fields: dict[str, Any] = {"id": iid, "url": url, "kind": kind, "models": models, "max_inflight": 64}
            fields.update({key: entry[key] for key in _ENTRY_FIELDS if key in entry})
            for name, (section, key) in _ENGINE_FIELDS.items():
                if key in sections[section]:
                    fields[name] = sections[section][key]
            fields.update(llamacpp)
            fields.update(extra)
            try:
                out.append(BackendConfig.from_dict(fields))
            except ConfigFieldError as exc:
                raise ConfigFieldError(_entry_path(at, exc.path, extra), f"{exc.message} (instance {iid!r})") from None
            except ValueError as exc:
                raise ConfigFieldError(at, f"instance {iid!r} (#{k}): {exc}") from None
    return out


def _llamacpp_fields(entry: Mapping[str, Any], at: tuple[str | int, ...]) -> dict[str, Any]:
    """BackendConfig fields of an `engine: llamacpp` entry, from the simulator's own reading of it."""
    from sagesched.sim.config import InstanceConfig
    from sagesched.sim.engines.llamacpp_instance import load_llamacpp_perf
    from sagesched.typed_config import ConfigFieldError

    sim_entry = {k: v for k, v in entry.items() if k not in LIVE_KEYS and k != "count"}
    sim_entry.setdefault("id", "instance")
    try:
        perf = load_llamacpp_perf(InstanceConfig.from_dict(sim_entry, root=at))
    except ConfigFieldError:
        raise
    except ValueError as exc:
        raise ConfigFieldError((*at, "llamacpp", "calibration"), str(exc)) from None
    out: dict[str, Any] = {
        "max_num_seqs": perf.config.n_parallel,
        "max_batch_tokens": perf.config.n_batch,
    }
    if perf.config.embeddings:
        out["embedding_tokens_per_s"] = perf.tokens_per_s
    else:
        out["prefill_tokens_per_s"] = perf.prefill_tokens_per_s
        out["decode_step_s"] = perf.decode_step_s
    return out


def block_tokens_of(entry: Mapping[str, Any]) -> int | None:
    """The prefix-hash block tokens an LLM entry declares (llama.cpp's `prefix_block_tokens`, vLLM's
    `prefix_hash_block_tokens`), or None."""
    if entry.get("engine") == "llamacpp":
        section = entry.get("llamacpp") or {}
        value = section.get("prefix_block_tokens")
        return int(value) if value is not None else None
    vllm = entry.get("vllm") or {}
    return int(vllm["prefix_hash_block_tokens"]) if "prefix_hash_block_tokens" in vllm else None


def _entry_path(at: tuple[str | int, ...], path: tuple[Any, ...], extra: Mapping[str, Any]) -> tuple[Any, ...]:
    """Where a BackendConfig field came from in the cluster entry."""
    if not path:
        return at
    name = path[0]
    if name in extra:
        return (*at, "backend", *path)
    if name in _ENGINE_FIELDS:
        return (*at, *_ENGINE_FIELDS[name], *path[1:])
    return (*at, *path)


def block_tokens(cluster: Mapping[str, Any], default: int = 512) -> int:
    """Tokens per prefix-hash block: the first LLM entry's `vllm.prefix_hash_block_tokens` or
    `llamacpp.prefix_block_tokens` (vLLM's 512 default)."""
    for entry in _entries(cluster):
        tokens = block_tokens_of(entry) if entry.get("kind", "llm") != "embedding" else None
        if tokens is not None:
            return tokens
    return default
