"""Backend emulators: vLLM and TEI look-alikes whose timing comes from the simulator's engine model.

They serve the real servers' HTTP surfaces and metric names on 127.0.0.1, while batching, KV-cache
limits and step times come from `sagesched.sim.engines` and `sagesched.sim.perf_model` running in
wall-clock time. Live mode can thus be exercised at GPU-like scale on a CPU, and compared against
the simulator on identical engine logic. Start one with `sagesched emulate vllm|tei ...` or, from
Python, `start_emulator("vllm", time_scale=0.1)`.
"""

from __future__ import annotations

from sagesched.live.emulators.runner import RunningEmulator, build_app, start_emulator

__all__ = ["RunningEmulator", "build_app", "start_emulator"]
