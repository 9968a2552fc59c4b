"""Reproduce reports/live_replay: the default workload, simulated and replayed live, fifo and hybrid.

    python reports/live_replay/make_report.py            # real llama-server backends (a few minutes)
    python reports/live_replay/make_report.py --emulators --out /tmp/lr   # a dry run on the emulators

What it does, in order (everything on 127.0.0.1, stopped at the end):

1. starts two llama-server LLM instances (Gemma 3 270M, `--parallel 2` each) and one llama-server
   embedding instance (sagesched.live.real_backends);
2. composes the default experiment (workload azure_conv: the Azure 2023 conversation trace plus
   the query-embedding stream, with its classes and SLOs) with the cluster below and the scaling
   in SCALING, and runs it four times: policy fifo and hybrid, each with driver=sim and
   driver=live (mode policy: our executor and policy over the three servers);
3. `sagesched compare` on sim vs live per policy, and live fifo vs live hybrid;
4. writes results.md (generated tables) next to the hand-written README.md.

The simulator has no CPU hardware profile: it models these instances as the same models on an
A100 (`model.hardware`), which is exactly the gap the sim-to-real calibration work will close.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent

# The default workload, shrunk to what two CPU llama-servers can serve on a shared 2-core machine.
SCALING = [
    "workload.rate_scale=0.1",  # a tenth of the trace's arrival rate (the trace averages ~5.4 chat req/s)
    "workload.duration_s=10",  # the first 10 s of the trace (13 chats), stretched by 1/rate_scale to ~100 s
    "+workload.lengths.max_prompt_tokens=128",  # clip prompts (trace mean ~1,000 tokens)
    "+workload.lengths.max_output_tokens=16",  # clip outputs (trace mean ~200 tokens)
    "workload.embedding.stream_rps=4.0",  # the default query stream, x rate_scale = 0.4/s (29 requests)
    "model.llm=gemma-3-270m",  # the model the llama-servers serve (and the simulator's profile of it)
    "model.embedding=all-minilm-l6-v2",  # the smallest encoder profile for the simulator
]
LIVE = ["driver.request_timeout_s=120"]  # a request unfinished 2 min after its arrival fails
POLICIES = ("fifo", "hybrid")


def cluster_config(llm_urls: list[str], embedding_url: str, llm_slots: int) -> dict[str, Any]:
    """Two LLM instances and one embedding instance, each naming its server."""
    instances = [
        {
            "id": "llm",
            "count": 2,
            "kind": "llm",
            "url": llm_urls,
            "model": "${model.llm}",
            "hardware": "${model.hardware}",
            "max_inflight": 2 * llm_slots,
            "vllm": {"max_num_seqs": llm_slots},
        },
        {
            "id": "emb",
            "kind": "embedding",
            "url": embedding_url,
            "embedding_model": "${model.embedding}",
            "hardware": "${model.hardware}",
            "max_inflight": 8,
        },
    ]
    return {"instances": instances}


def compose(overrides: list[str], cluster: dict[str, Any]) -> Any:
    """The experiment config for `overrides`, with `cluster` in place of the cluster group."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from sagesched.experiment import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = hydra_compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.cluster = OmegaConf.create(cluster)
    return cfg


@contextlib.contextmanager
def backends(emulators: bool, llm_slots: int):
    """(llm urls, embedding url) of running servers; stopped on exit."""
    stack = contextlib.ExitStack()
    with stack:
        if emulators:
            from sagesched.live.emulators.runner import start_emulator

            llms = [stack.enter_context(start_emulator("vllm", model="gemma-3-270m", time_scale=1.0)) for _ in range(2)]
            emb = stack.enter_context(start_emulator("tei", model="all-minilm-l6-v2"))
            yield [s.url for s in llms], emb.url, "emulators (sagesched emulate vllm/tei)"
        else:
            from sagesched.live import real_backends as rb

            # One ggml thread per server: three servers share two cores with other work, and ggml's
            # spinning workers made 2 threads each several times slower (real_backends.default_threads).
            os.environ.setdefault("SAGESCHED_LLAMA_THREADS", "1")

            llms = [stack.enter_context(rb.start_llama_server(parallel=llm_slots)) for _ in range(2)]
            emb = stack.enter_context(rb.start_llama_server(embeddings=True, parallel=1))
            yield [s.url for s in llms], emb.url, f"llama-server ({' '.join(llms[0].command[1:])})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulators", action="store_true", help="use the emulators instead of llama-server (dry run)")
    parser.add_argument("--out", default=str(HERE), help="report folder (default: this folder)")
    parser.add_argument("--llm-slots", type=int, default=2, help="llama-server --parallel per LLM instance")
    args = parser.parse_args(argv)

    from sagesched.experiment import run
    from sagesched.replay.compare import compare

    out = Path(args.out)
    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    summaries: dict[str, dict[str, Any]] = {}
    with backends(args.emulators, args.llm_slots) as (llm_urls, embedding_url, what):
        cluster = cluster_config(llm_urls, embedding_url, args.llm_slots)
        for policy in POLICIES:
            for driver in ("sim", "live"):
                name = f"{policy}_{driver}"
                overrides = [f"policy={policy}", *SCALING, f"driver={driver}", *(LIVE if driver == "live" else [])]
                print(f"== {name}", flush=True)
                summaries[name] = run(compose(overrides, cluster), runs / name, progress=False)
    texts = []
    for a, b in [(f"{p}_sim", f"{p}_live") for p in POLICIES] + [("fifo_live", "hybrid_live")]:
        folder = out / "compare" / f"{a}__vs__{b}"
        texts.append(compare(runs / a, runs / b, folder, labels=[a, b]).replace("![latency CDFs](cdf.png)", ""))
        texts.append(f"![latency CDFs](compare/{folder.name}/cdf.png)")
    live = summaries["hybrid_live"]
    header = [
        "# Live replay results (generated by make_report.py; prose in README.md)",
        "",
        f"Backends: {what}. Requests per run: {live['requests']} "
        f"({live['llm_requests']} chat, {live['embedding_requests']} embedding).",
        f"Scaling of the default workload: `{' '.join(SCALING)}`.",
        "",
        "| run | completed | rejected | failed | TTFT p50 | TTFT p99 | TPOT p50 | e2e p99 | embedding p99 | SLO att. |"
        " send lateness p99 | prompt mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: Any, fmt: str = "{:.0f}") -> str:
        return "–" if value is None else fmt.format(value)

    for name, s in summaries.items():
        header.append(
            f"| {name} | {s['completed']} | {s['rejected']} | {s['failed']} | {cell(s.get('ttft_p50_ms'))} | "
            f"{cell(s.get('ttft_p99_ms'))} | {cell(s.get('tpot_p50_ms'), '{:.1f}')} | {cell(s.get('e2e_p99_ms'))} | "
            f"{cell(s.get('embedding_p99_ms'), '{:.1f}')} | {cell(s.get('slo_attainment'), '{:.3f}')} | "
            f"{cell(s.get('send_lateness_p99_ms'), '{:.2f}')} | {cell(s.get('prompt_token_mismatches'))} |"
        )
    header += ["", "Latencies in ms. Each comparison below: A = first run, B = second.", ""]
    (out / "results.md").write_text("\n".join(header + [t.replace("\n# ", "\n## ") for t in texts]) + "\n")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
