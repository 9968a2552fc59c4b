"""Experiment-level bad input: it must fail loudly, naming the fix, or say plainly what went wrong."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from sagesched.experiment import (
    ExperimentError,
    check_overrides,
    conf_dir,
    format_summary,
    run,
)


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        return compose(config_name="config", overrides=overrides)


def test_trace_path_works_as_the_docs_write_it(tmp_path):
    trace = tmp_path / "conv.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    cfg = _compose([f"workload.trace_path={trace}"])  # no `++`
    assert cfg.workload.trace_path == str(trace)


@pytest.mark.parametrize("override", ["+bogus=1", "++rate_scale=2"])
def test_unknown_top_level_override_is_refused_with_the_fix(override):
    with pytest.raises(ExperimentError, match="never reads; set a field of a config group instead") as info:
        check_overrides([override], ["policy", "workload", "cluster", "sim", "model", "driver"])
    assert "workload." in str(info.value)


def test_known_overrides_pass():
    groups = ["policy", "workload", "cluster", "sim", "model", "driver", "benchmark"]
    check_overrides(["+benchmark=azure_conv", "seed=2", "+workload.extra=1", "workload.rate_scale=2"], groups)


def test_a_cluster_that_cannot_serve_part_of_the_workload_says_so(tmp_path):
    # The cluster serves llama-2-7b; the workload asks for llama-3-8b chats: every chat is
    # rejected, only the embedding stream is served.
    cfg = _compose(["policy=fifo", "workload.duration_s=20", "workload.llm_model=llama-3-8b", "sim.progress=false"])
    summary = run(cfg, tmp_path)
    assert 0 < summary["rejected"] < summary["requests"] and summary["completed"] > 0
    reasons = summary["ended_reasons"]["rejected"]
    assert any("llama-3-8b" in reason for reason in reasons)
    text = format_summary(summary)
    pct = 100.0 * summary["rejected"] / summary["requests"]
    assert f"WARNING: {summary['rejected']} of {summary['requests']} requests ({pct:.1f}%) rejected" in text


def test_fail_on_unserved_gives_a_nonzero_exit_only_when_asked(tmp_path):
    base = [
        sys.executable,
        "-m",
        "sagesched.experiment",
        "policy=fifo",
        "workload.duration_s=10",
        "workload.llm_model=llama-3-8b",
        "sim.progress=false",
    ]
    quiet = subprocess.run([*base, f"hydra.run.dir={tmp_path / 'a'}"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "WARNING" in quiet.stdout and "rejected" in quiet.stdout
    strict = subprocess.run(
        [*base, "fail_on_unserved=true", f"hydra.run.dir={tmp_path / 'b'}"], capture_output=True, text=True, timeout=300
    )
    assert strict.returncode == 3
    bogus = subprocess.run([*base, "+bogus=1", f"hydra.run.dir={tmp_path / 'c'}"], capture_output=True, text=True)
    assert bogus.returncode == 2 and "'+bogus=1' adds a top-level key 'bogus'" in bogus.stderr
