"""Fixtures for the replay tests: emulators (vLLM + TEI) and one sim/live pair of the same config.

The pair is built once per session (a few seconds of replay) and shared by the tests that check
the outputs' schema, the accounting and `compare`; tests that need their own run make it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from sagesched.experiment import conf_dir, run
from sagesched.live.emulators.runner import RunningEmulator, start_emulator

# A short window of the default experiment (Azure conv trace + the embedding stream), on a cluster
# of one vLLM emulator and one TEI emulator.
WINDOW = ["workload.duration_s=6", "workload.rate_scale=2.0"]


def compose_config(overrides: list[str]) -> Any:
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


def emulator_overrides(llm: RunningEmulator, tei: RunningEmulator) -> list[str]:
    return ["cluster=emulators", f"cluster.instances.0.url={llm.url}", f"cluster.instances.1.url={tei.url}"]


@pytest.fixture(scope="session")
def emulators() -> Iterator[tuple[RunningEmulator, RunningEmulator]]:
    """A vLLM emulator (engine model at 0.2x wall time, so runs stay short) and a TEI emulator."""
    llm = start_emulator("vllm", time_scale=0.2)
    tei = start_emulator("tei", time_scale=0.2)
    yield llm, tei
    llm.stop()
    tei.stop()


class RunPair:
    def __init__(self, root: Path) -> None:
        self.sim, self.live = root / "sim", root / "live"

    def records(self, which: str) -> pd.DataFrame:
        return pd.read_parquet(getattr(self, which) / "requests.parquet")

    def summary(self, which: str) -> dict[str, Any]:
        return json.loads((getattr(self, which) / "summary.json").read_text())


@pytest.fixture(scope="session")
def run_pair(emulators, tmp_path_factory) -> RunPair:
    """The same config run with driver=sim and driver=live (policy hybrid) against the emulators."""
    llm, tei = emulators
    pair = RunPair(tmp_path_factory.mktemp("pair"))
    base = emulator_overrides(llm, tei) + WINDOW
    run(compose_config(base), pair.sim, progress=False)
    run(compose_config([*base, "driver=live"]), pair.live, progress=False)
    return pair
