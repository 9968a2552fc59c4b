"""One cluster config for both drivers: an instance entry may name its live server with `url:`.

The simulator reads an entry's engine fields (hardware, vllm.*, tei.*, ...) and ignores the live
ones; the live driver turns each entry into a `BackendConfig` for the executor. Live-only keys:

url: the server's base URL (a list of URLs for an entry with `count: N`, one per instance).
api: "openai" (default) or "tei" (TEI's native /embed).
api_key: bearer token for the server.
scrape_metrics: read the server's /metrics load gauges (default true).
backend: further `BackendConfig` fields (e.g. {prefill_tokens_per_s: 400, decode_step_s: 0.05}).

A cluster meant only for live use may give just `id`, `kind`, `url` and the model names.
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


def backend_configs(cluster: Mapping[str, Any]) -> list[Any]:
    """One `BackendConfig` per instance (entries with `count: N` expand to `<id>-0..N-1`)."""
    from sagesched.live.backends import BackendConfig

    out: list[BackendConfig] = []
    for entry in _entries(cluster):
        ident = str(entry.get("id") or "instance")
        count = entry.get("count")
        urls = entry.get("url")
        if urls is None:
            raise ValueError(
                f"cluster instance {ident!r} has no `url:`; driver=live needs each instance's server, e.g. "
                "`url: http://127.0.0.1:8000` (conf/cluster/emulators.yaml shows one), or use driver=sim"
            )
        n = 1 if count is None else int(count)
        if isinstance(urls, str):
            urls = [urls] * n if n == 1 else None
        if urls is None or len(urls) != n:
            raise ValueError(f"cluster instance {ident!r} has count {n}: give `url:` as a list of {n} URLs, one each")
        ids = [ident] if count is None else [f"{ident}-{k}" for k in range(n)]
        kind = str(entry.get("kind", "llm"))
        models = [entry["model"]] if kind != "embedding" and entry.get("model") else []
        if kind != "llm" and entry.get("embedding_model"):
            models.append(entry["embedding_model"])
        vllm = entry.get("vllm") or {}
        tei = entry.get("tei") or {}
        extra = dict(entry.get("backend") or {})
        for k, (iid, url) in enumerate(zip(ids, urls, strict=True)):
            fields: dict[str, Any] = {
                "id": iid,
                "url": url,
                "kind": kind,
                "models": models,
                "max_inflight": int(entry.get("max_inflight", 64)),
                "api": entry.get("api", "openai"),
                "api_key": entry.get("api_key"),
                "scrape_metrics": bool(entry.get("scrape_metrics", True)),
            }
            if "max_num_seqs" in vllm:
                fields["max_num_seqs"] = int(vllm["max_num_seqs"])
            if "max_num_batched_tokens" in vllm:
                fields["max_batch_tokens"] = int(vllm["max_num_batched_tokens"])
            if "max_client_batch_size" in tei:
                fields["max_client_batch_size"] = int(tei["max_client_batch_size"])
            fields.update(extra)
            try:
                out.append(BackendConfig.from_dict(fields))
            except ValueError as exc:
                raise ValueError(f"cluster instance {iid!r} (#{k}): {exc}") from None
    return out


def block_tokens(cluster: Mapping[str, Any], default: int = 512) -> int:
    """Tokens per prefix-hash block: the first LLM entry's `vllm.prefix_hash_block_tokens` (vLLM's 512 default)."""
    for entry in _entries(cluster):
        vllm = entry.get("vllm") or {}
        if entry.get("kind", "llm") != "embedding" and "prefix_hash_block_tokens" in vllm:
            return int(vllm["prefix_hash_block_tokens"])
    return default
