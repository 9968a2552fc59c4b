"""Ctrl-C during a live replay: sending stops, nothing is lost, the partial run is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_writes_partial_results_with_every_request_accounted(emulators, tmp_path):
    llm, tei = emulators
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "sagesched.experiment", "driver=live", "driver.progress=false",
        "cluster=emulators", f"cluster.instances.0.url={llm.url}", f"cluster.instances.1.url={tei.url}",
        "workload.duration_s=60", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    lines = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the replay is under way
        lines.append(line)
        if "live executor started" in line or time.monotonic() > deadline:
            break
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    records = pd.read_parquet(out / "requests.parquet")
    live = pd.read_parquet(out / "live.parquet")
    assert summary["interrupted"] is True
    assert len(records) == len(live) == summary["requests"] and records["request_id"].is_unique
    assert set(records["request_id"]) == set(live["request_id"])
    not_sent = records["reason"].str.startswith("interrupted: not sent")
    assert not_sent.any() and (records.loc[not_sent, "outcome"] == "failed").all()
    assert (records["outcome"] == "completed").any()
    assert (records.loc[records["outcome"] != "completed", "reason"] != "").all()
    assert live["send_s"].isna().sum() == not_sent.sum()
