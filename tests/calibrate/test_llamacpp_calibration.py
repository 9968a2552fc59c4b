"""Probe calibration of the llama.cpp engine model, the live/simulated sweep, and the part-(ii) report code.

Pure tests check that the fit recovers a known CPU model from probe values the engine model produces,
and that calibration files, workloads and report blocks behave; tests marked `backends` run the probes
and a short live replay against the real llama-server (Gemma 3 270M) on 127.0.0.1.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sagesched.calibrate import live_report
from sagesched.calibrate import llamacpp_probe as lp
from sagesched.calibrate import llamacpp_sweep as sw
from sagesched.calibrate.llamacpp_server import ServerSettings
from sagesched.sim.engines.llamacpp_perf import (
    FEATURES,
    CalibrationFileError,
    CpuStepModel,
    LlamaCppCalibration,
    load_llamacpp_calibration,
)

SETTINGS = ServerSettings()  # -np 4 -c 8192 -b 2048 -ub 512: what the llm_server fixture runs
TRUTH = CpuStepModel(
    step_s=0.004,
    ubatch_s=0.01,
    row_block_s=0.005,
    row_tail1_s=0.03,
    row_tail2_s=0.04,
    row_tail3_s=0.08,
    output_s=0.012,
    seq_s=0.002,
    kv_pair_s=2e-6,
)


def synthetic_probes(model: CpuStepModel, frontend_s: float) -> list[lp.Probe]:
    """The default probe plan's points, each 'measured' as the engine model says `model` would take."""
    plan = lp.ProbePlan()
    probes = [lp.Probe("idle", "1", [lp.StepSpec(prompts=((0, 1),))], True)]
    probes += [lp.Probe("prefill", str(n), [lp.StepSpec(prompts=((0, n),))], True) for n in plan.prefill_lengths]
    for ctx in plan.decode_contexts:
        for slots in plan.decode_slot_sets:
            probes.append(
                lp.Probe("decode", f"{slots}@{ctx}", [lp.StepSpec(decodes=tuple((s, ctx) for s in slots))], False)
            )
    for slots, slot, n in plan.mixed:
        spec = lp.StepSpec(decodes=tuple((s, 21) for s in slots), prompts=((slot, n),))
        probes.append(lp.Probe("mixed", f"{slots}+{slot}:{n}", [spec], False))
    coef = np.array([*model.coefficients, frontend_s])
    cfg = SETTINGS.engine_config()
    for p, row in zip(probes, lp.design(probes, cfg), strict=True):
        p.samples = [float(row @ coef)]
    return probes


def test_the_fit_recovers_a_known_cpu_model_from_its_own_probe_times():
    probes = synthetic_probes(TRUTH, frontend_s=0.003)
    result = lp.fit(probes, SETTINGS.engine_config())
    got = result["coefficients"]
    for name in (*FEATURES, "frontend_request_s"):
        want = getattr(TRUTH, name, 0.003)
        assert got[name] == pytest.approx(want, rel=1e-4, abs=1e-9), name
    assert result["mean_abs_residual"] < 1e-6 and result["mean_abs_leave_one_out"] < 1e-4
    assert set(result["mean_abs_leave_one_kind_out"]) == {"idle", "prefill", "decode", "mixed"}


def test_probe_designs_follow_llama_cpp_batching():
    cfg = SETTINGS.engine_config()
    idx = {n: i for i, n in enumerate(FEATURES)}
    # Decoding slots 0 and 2 are not consecutive: two micro-batches of one gemv row each, one step.
    f = lp.step_features(cfg, lp.StepSpec(decodes=((0, 20), (2, 20))))
    assert f[idx["step_s"]] == 1 and f[idx["ubatch_s"]] == 2 and f[idx["row_tail1_s"]] == 2
    # Four consecutive slots: one micro-batch, the rows and logits in one block of 4.
    f = lp.step_features(cfg, lp.StepSpec(decodes=tuple((s, 20) for s in range(4))))
    assert f[idx["ubatch_s"]] == 1 and f[idx["row_block_s"]] == 4 and f[idx["output_s"]] == 4
    assert f[idx["row_tail1_s"]] == f[idx["row_tail2_s"]] == f[idx["row_tail3_s"]] == 0
    # A lone 99-token prompt on Gemma 3: 95 tokens (23 blocks of 4 and 3 left over), a checkpoint, then
    # the last 4 with the first token.
    f = lp.step_features(cfg, lp.StepSpec(prompts=((0, 99),)))
    assert f[idx["step_s"]] == 2 and f[idx["row_block_s"]] == 92 + 4 and f[idx["row_tail3_s"]] == 1
    assert f[idx["output_s"]] == 1


def test_calibration_files_round_trip_and_bad_ones_name_the_fix(tmp_path):
    cal = LlamaCppCalibration(
        step=TRUTH, frontend_request_s=0.003, model="m", hardware="cpu", server=SETTINGS.as_dict()
    )
    path = cal.write(tmp_path / "cpu.yaml")
    back = load_llamacpp_calibration(path)
    assert back.step == TRUTH and back.frontend_request_s == pytest.approx(0.003)
    assert back.server["n_parallel"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: vllm\nlinear_scale: 1.0\n")
    with pytest.raises(CalibrationFileError, match="sagesched calibrate llamacpp"):
        load_llamacpp_calibration(bad)
    bad.write_text("engine: llamacpp\nstep: {ubatch_s: 0.1, warp_s: 2}\n")
    with pytest.raises(CalibrationFileError, match="warp_s"):
        load_llamacpp_calibration(bad)
    with pytest.raises(CalibrationFileError, match="no shipped calibration"):
        load_llamacpp_calibration("no-such-cpu")


def test_workloads_are_one_sequence_stretched_by_the_rate():
    spec = sw.WorkloadSpec(n=30, seed=3)
    slow, fast = spec.items(0.5), spec.items(2.0)
    assert [(a.prompt_tokens, a.output_tokens) for a in slow] == [(b.prompt_tokens, b.output_tokens) for b in fast]
    assert fast[-1].arrival_s == pytest.approx(slow[-1].arrival_s / 4)
    short = sw.WorkloadSpec(n=10, seed=3).items(0.5)
    assert short == slow[:10]  # fewer requests: a prefix of the same sequence
    assert all(spec.prompt_min <= w.prompt_tokens <= spec.prompt_max for w in slow)
    with pytest.raises(ValueError):
        spec.items(0.0)


def test_simulated_latency_grows_with_load_and_capacity_is_where_it_saturates():
    cal = LlamaCppCalibration(step=TRUTH, frontend_request_s=0.003)
    cfg = SETTINGS.engine_config()
    spec = sw.WorkloadSpec(n=60)
    cap = sw.capacity(spec, cal, cfg)
    light = sw.summarize(sw.simulate(spec.items(0.2 * cap), cal, cfg))
    heavy = sw.summarize(sw.simulate(spec.items(1.5 * cap), cal, cfg))
    assert light["completed"] == heavy["completed"] == 60
    assert heavy["ttft"]["p90"] > 2 * light["ttft"]["p90"]
    assert heavy["e2e"]["p50"] > light["e2e"]["p50"]


def test_report_block_replaces_only_the_marked_part_of_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{live_report.MARK_BEGIN}\nold numbers\n{live_report.MARK_END}\nlimitations\n")
    live_report.update_readme(readme, "new numbers")
    text = readme.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.startswith("intro\n") and text.endswith("limitations\n")


@pytest.mark.backends
def test_probes_of_the_real_llama_server_fit_a_usable_model(llm_server, tmp_path):
    plan = lp.ProbePlan(
        prefill_lengths=(8, 64),
        decode_slot_sets=((0,), (0, 1)),
        decode_contexts=(16,),
        decode_tokens=6,
        mixed=(((0,), 1, 48),),
        repeats=1,
    )
    probes = asyncio.run(lp.run_llm_probes(llm_server.url, llm_server.model, SETTINGS.engine_config(), plan))
    assert [p.kind for p in probes] == ["idle", "prefill", "prefill", "decode", "decode", "mixed"]
    # Timing orderings between probes are not asserted: on a shared machine other jobs can stretch any one
    # of them. What must hold: every probe measured something, and the engine model's design for each
    # probe has the batch the probe was built to produce (the mixed step carries the 48-token prompt).
    assert all(np.isfinite(p.seconds) and p.seconds > 0 for p in probes)
    a = lp.design(probes, SETTINGS.engine_config())
    rows = [FEATURES.index("row_block_s"), FEATURES.index("row_tail1_s")]
    assert a[-1, rows].sum() > a[3, rows].sum()
    result = lp.fit(probes, SETTINGS.engine_config())
    assert all(np.isfinite(v) and v >= 0 for v in result["coefficients"].values())
    assert len(result["points"]) == len(probes)
    cal = lp.calibration_from_fit(
        result, model=llm_server.model, hardware="test", server=SETTINGS.as_dict(), source="t"
    )
    again = load_llamacpp_calibration(cal.write(tmp_path / "cal.yaml"))
    assert again.step.coefficients == pytest.approx(cal.step.coefficients, rel=1e-5)


@pytest.mark.backends
def test_a_live_replay_completes_every_request_with_its_exact_output_length(llm_server):
    items = sw.WorkloadSpec(n=4, prompt_median=16, prompt_max=40, output_min=2, output_max=5, seed=5).items(rate=4.0)
    outcomes = sw.run_live(llm_server.url, llm_server.model, items, seed=1)
    assert [o.id for o in outcomes] == [it.id for it in items]
    for o, it in zip(outcomes, items, strict=True):
        assert o.status == 200, o.error
        assert 0 < o.ttft_s <= o.e2e_s
        assert o.output_tokens == it.output_tokens  # ignore_eos + max_tokens: exactly the workload's length


@pytest.mark.backends
def test_embedding_probes_time_single_and_multi_input_calls(embedding_server):
    probes = asyncio.run(
        lp.run_embedding_probes(
            embedding_server.url, embedding_server.model, lengths=(8, 64), multi=((3, 8),), repeats=1
        )
    )
    assert [p.label for p in probes] == ["1 x 8", "1 x 64", "3 x 8"]
    assert all(p.seconds > 0 for p in probes)
    assert len(probes[2].steps) == 3  # one slot: three inputs are three steps
    result = lp.fit(
        probes,
        ServerSettings(parallel=1, ctx_size=2048, n_batch=2048, n_ubatch=2048, embeddings=True).engine_config(),
        lp.EMBEDDING_COLUMNS,
    )
    assert set(result["coefficients"]) == set(lp.EMBEDDING_COLUMNS)


def test_shipped_cpu_entries_load_and_simulate_this_workload():
    for name in ("gemma-3-270m-q4km-xeon-2cpu-t1", "gemma-3-270m-q4km-xeon-2cpu-t1-embedding"):
        cal = load_llamacpp_calibration(name)
        settings = ServerSettings.from_dict(cal.server or {})
        assert settings.threads == 1 and cal.fit and cal.fit["points"]  # provenance travels with the numbers
        spec = sw.WorkloadSpec(n=20, embeddings=settings.embeddings)
        cap = sw.capacity(spec, cal, settings.engine_config())
        assert 0.05 < cap < 50  # requests/s a 2-vCPU machine can plausibly serve with Gemma 3 270M
        outcomes = sw.simulate(spec.items(0.5 * cap), cal, settings.engine_config())
        assert all(o.status == 200 and 0 < o.ttft_s <= o.e2e_s for o in outcomes)


@pytest.mark.backends
def test_a_failed_probe_stops_the_server_it_started(monkeypatch, tmp_path):
    started = []
    real_start = live_report.start_server

    def start(settings, cpus):
        server = real_start(settings, cpus)
        started.append(server)
        return server

    def fail(*args, **kwargs):
        assert started and started[0].alive  # the server was up while it was probed
        raise ConnectionError("probe lost its server")

    monkeypatch.setattr(live_report, "start_server", start)
    monkeypatch.setattr(lp, "probe_and_fit", fail)
    with pytest.raises(ConnectionError, match="probe lost its server"):
        live_report.calibrate_server(ServerSettings(parallel=1, ctx_size=2048), None, tmp_path, "llm", quick=True)
    assert len(started) == 1 and not started[0].alive
