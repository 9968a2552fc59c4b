"""`sagesched calibrate probe` against a real server on 127.0.0.1: our vLLM emulator, whose timing is a
known performance model, so the coefficients the probes recover can be checked against the truth."""

from __future__ import annotations

import asyncio
import math

import pytest

from sagesched.calibrate.cli import main as calibrate_main
from sagesched.calibrate.probe import ProbePoint, fit_probes, run_probes
from sagesched.sim.engines.llamacpp import AffineStepModel
from sagesched.sim.perf.calibration import LLMCalibration, parse_calibration, read_calibration_file
from sagesched.sim.perf_model import BatchShape, LLMPerfModel


def test_probes_of_the_emulator_recover_its_performance_model(emulator, tmp_path):
    emu = emulator("vllm", model="llama-2-7b", hardware="a100", time_scale=1.0)
    points = asyncio.run(
        run_probes(
            emu.url, emu.model, prompt_lengths=(64, 512, 1536), concurrencies=(1, 4, 12), decode_tokens=24, repeats=2
        )
    )
    assert [p.kind for p in points] == ["prefill"] * 3 + ["decode"] * 3
    perf = LLMPerfModel.load("llama-2-7b", "a100")
    fit = fit_probes(points, "vllm", perf)
    c = fit["coefficients"]
    # The emulator steps exactly as this perf model says (plus a little HTTP/event-loop time).
    assert c["linear_scale"] == pytest.approx(1.0, abs=0.15)
    assert max(abs(r) for r in fit["residuals"]) < 0.1
    out = tmp_path / "cal.yaml"
    rc = calibrate_main(
        [
            "probe",
            emu.url,
            "--model",
            emu.model,
            "--engine",
            "vllm",
            "--profile",
            "llama-2-7b",
            "--hardware",
            "a100",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    cal = parse_calibration(
        read_calibration_file(out), LLMCalibration, str(out), {"model": "llama-2-7b", "hardware": "a100"}
    )
    assert cal.linear_scale == pytest.approx(1.0, abs=0.2)


def test_affine_fit_recovers_a_known_cpu_model_exactly():
    truth = AffineStepModel(step_s=0.02, prefill_token_s=4e-4, decode_seq_s=3e-3, context_pair_s=2e-7)
    fe = 0.004
    points = []
    for p in (16, 128, 512, 1024):
        shape = BatchShape(
            prefill_tokens=p, prefill_context_tokens=p, num_prefills=1, prefill_attention_pairs=p * p / 2
        )
        points.append(ProbePoint("prefill", p, 1, 1, fe + truth.step_time_s(shape)))
    for c in (1, 2, 4, 8):
        shape = BatchShape(decode_tokens=c, decode_context_tokens=int(c * (64 + 16)))
        points.append(ProbePoint("decode", 64, c, 32, truth.step_time_s(shape)))
    fit = fit_probes(points, "llamacpp")
    got = fit["coefficients"]
    for key, want in (("step_s", 0.02), ("prefill_token_s", 4e-4), ("decode_seq_s", 3e-3), ("frontend_request_s", fe)):
        assert got[key] == pytest.approx(want, rel=1e-3, abs=1e-9)
    assert max(abs(r) for r in fit["leave_one_out"]) < 1e-3


@pytest.mark.backends
def test_probes_run_against_a_real_llama_server(llm_server):
    points = asyncio.run(
        run_probes(
            llm_server.url, llm_server.model, prompt_lengths=(16, 96), concurrencies=(1, 2), decode_tokens=6, repeats=1
        )
    )
    assert [(p.kind, p.prompt_tokens, p.concurrency) for p in points] == [
        ("prefill", 16, 1),
        ("prefill", 96, 1),
        ("decode", 64, 1),
        ("decode", 64, 2),
    ]
    assert all(p.seconds > 0 for p in points)
    # Timings are not compared with each other: on a shared machine another process can stall any
    # one request (a 16-token prefill took 3.5 s, longer than a 96-token one, in a CI run under load).
    fit = fit_probes(points, "llamacpp")
    assert all(v >= 0 for v in fit["coefficients"].values())
    assert len(fit["leave_one_out"]) == 4
    assert all(math.isfinite(r) for r in fit["leave_one_out"])
