"""The performance model: shipped profiles, physics sanity, fit error, calibration files, the fit command."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sagesched.sim import fit
from sagesched.sim.perf.piecewise import PiecewiseLinear, fit_hinges
from sagesched.sim.perf.profiles import PROFILES_DIR, load_hardware, load_model
from sagesched.sim.perf_model import (
    BatchShape,
    EmbeddingPerfModel,
    LLMPerfModel,
    available_embedding_models,
    available_hardware,
    available_llm_models,
    available_models,
    valid_tensor_parallel,
)

LLMS = ["llama-2-7b", "llama-2-70b", "llama-3-8b", "gemma-3-270m"]
ENCODERS = ["bge-base", "bge-m3", "all-minilm-l6-v2"]
CAL_DIR = PROFILES_DIR / "calibration"


@pytest.fixture(scope="module")
def report() -> dict:
    return fit.run()


# ---------------------------------------------------------------------------------------------- profiles


def test_names_are_the_documented_ones() -> None:
    assert available_hardware() == ["a100", "h100", "h200"]
    assert sorted(available_llm_models()) == sorted(LLMS)
    assert sorted(available_embedding_models()) == sorted(ENCODERS)
    assert sorted(available_models()) == sorted(LLMS + ENCODERS)


@pytest.mark.parametrize("hw", ["a100", "h100"])
@pytest.mark.parametrize("model", LLMS)
def test_every_llm_profile_loads_at_every_valid_tp(model: str, hw: str) -> None:
    for tp in valid_tensor_parallel(load_model(model)):
        perf = LLMPerfModel.load(model, hw, tp)
        t = perf.step_time_s(
            BatchShape(
                prefill_tokens=100,
                decode_tokens=10,
                prefill_context_tokens=100,
                decode_context_tokens=5000,
                num_prefills=1,
            )
        )
        assert 0 < t < 10 and math.isfinite(t)
        assert perf.prefill_tokens_per_s > 0 and 0 < perf.decode_step_s < 1


@pytest.mark.parametrize("hw", ["a100", "h100"])
@pytest.mark.parametrize("model", ENCODERS)
def test_every_embedding_profile_loads(model: str, hw: str) -> None:
    perf = EmbeddingPerfModel.load(model, hw)
    assert 0 < perf.batch_time_s(1, 16, 16) < perf.batch_time_s(32, 32 * 256, 256)
    assert perf.tokens_per_s > 10_000


def test_model_profiles_match_their_published_shapes() -> None:
    # Parameter counts implied by the shapes agree with the stated totals (config.json arithmetic).
    for name in LLMS:
        m = load_model(name)
        q = m.num_heads * m.head_dim
        kv = m.num_kv_heads * m.head_dim
        per_layer = m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
        emb = m.vocab_size * m.hidden_size * (1 if name == "gemma-3-270m" else 2)  # gemma ties its LM head
        assert per_layer * m.num_layers + emb == pytest.approx(m.num_params, rel=0.01), name
        assert m.kv_bytes_per_token == m.computed_kv_bytes_per_token()
    assert load_hardware("a100").peak_bf16_flops == 312e12
    assert load_hardware("h100").hbm_bandwidth_bytes_per_s == 3.35e12


def test_vidur_where_measured_roofline_elsewhere() -> None:
    assert LLMPerfModel.load("llama-2-7b", "a100").source == "vidur"
    assert LLMPerfModel.load("llama-3-8b", "a100", 2).vidur_file == "a100_Meta-Llama-3-8B_mlp.csv"
    assert LLMPerfModel.load("llama-3-8b", "h100").source == "roofline"
    assert LLMPerfModel.load("gemma-3-270m", "a100").source == "roofline"


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown LLM model 'llama-9'.*llama-2-7b"):
        LLMPerfModel.load("llama-9", "a100")
    with pytest.raises(ValueError, match=r"unknown hardware 'v100'.*'a100', 'h100'"):
        LLMPerfModel.load("llama-2-7b", "v100")
    with pytest.raises(ValueError, match=r"bge-base"):
        EmbeddingPerfModel.load("bert-huge", "a100")
    with pytest.raises(ValueError, match=r"unknown hardware"):
        EmbeddingPerfModel.load("bge-base", "tpu")


def test_kind_and_tp_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="need an LLM"):
        LLMPerfModel.load("bge-base", "a100")
    with pytest.raises(ValueError, match="need an embedding model"):
        EmbeddingPerfModel.load("llama-2-7b", "a100")
    with pytest.raises(ValueError, match=r"tensor_parallel=3 .*valid: \[1, 2, 4, 8\]"):
        LLMPerfModel.load("llama-2-7b", "a100", 3)
    with pytest.raises(ValueError, match=r"valid: \[1, 2, 4\]"):
        LLMPerfModel.load("gemma-3-270m", "a100", 8)


# ---------------------------------------------------------------------------------------------- physics


shapes = st.builds(
    lambda p, d, extra_p, dctx, k: BatchShape(
        prefill_tokens=p,
        decode_tokens=d,
        prefill_context_tokens=p + extra_p,
        decode_context_tokens=d * dctx,
        num_prefills=min(k, p) if p else 0,
    ),
    st.integers(0, 8192),
    st.integers(0, 256),
    st.integers(0, 8192),
    st.integers(1, 4096),
    st.integers(1, 8),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bump=st.sampled_from(["prefill", "decode", "pctx", "dctx"]), by=st.integers(1, 2048))
def test_step_time_is_monotone_in_tokens_and_context(shape: BatchShape, bump: str, by: int) -> None:
    for perf in (LLMPerfModel.load("llama-2-7b", "a100"), LLMPerfModel.load("llama-3-8b", "h100", 2)):
        fields = dataclasses.asdict(shape)
        more = dict(fields)
        if bump == "prefill":
            more["prefill_tokens"] += by
            more["prefill_context_tokens"] += by
            more["num_prefills"] = max(1, more["num_prefills"])
        elif bump == "decode":
            more["decode_tokens"] += by
        elif bump == "pctx":
            more["prefill_context_tokens"] += by
        else:
            more["decode_context_tokens"] += by
        base = BatchShape(**fields)
        assert perf.step_time_s(BatchShape(**more)) >= perf.step_time_s(base) - 1e-12


@pytest.mark.parametrize("model", LLMS)
def test_step_time_is_affine_in_decode_context(model: str) -> None:
    # The simulator advances decode runs in one jump by summing an arithmetic series of step times.
    perf = LLMPerfModel.load(model, "a100")
    t = [perf.step_time_s(BatchShape(decode_tokens=7, decode_context_tokens=1000 + 7 * j)) for j in range(50)]
    d = t[1] - t[0]
    assert d > 0
    assert all(abs(t[0] + d * j - t[j]) <= 1e-12 for j in range(50))


@pytest.mark.parametrize("hw", ["a100", "h100"])
def test_components_sum_to_the_step_time(hw: str) -> None:
    perf = LLMPerfModel.load("llama-2-70b", hw, 4)
    b = BatchShape(
        prefill_tokens=700, decode_tokens=40, prefill_context_tokens=1900, decode_context_tokens=30000, num_prefills=2
    )
    assert sum(perf.components(b).values()) == pytest.approx(perf.step_time_s(b), rel=1e-12)
    assert perf.step_time_s(BatchShape()) == 0.0


def test_long_prefill_is_roughly_linear_in_tokens() -> None:
    perf = LLMPerfModel.load("llama-2-7b", "a100")

    def prefill(n: int) -> float:
        return perf.step_time_s(BatchShape(prefill_tokens=n, prefill_context_tokens=n, num_prefills=1))

    for n in (2048, 4096):
        assert 1.9 < prefill(2 * n) / prefill(n) < 2.3  # linear GEMMs dominate; attention adds a little
    # Throughput of a 2k chunk: ~2 x 6.7e9 FLOPs/token at 60-75% of 312 TFLOPS -> 14-17k tokens/s.
    assert 12_000 < perf.prefill_tokens_per_s < 20_000


def test_llama2_7b_a100_single_decode_step_is_realistic() -> None:
    # Weights alone (13.5 GB at 2.04 TB/s) bound a decode step below by 6.6 ms; vLLM/Vidur-class stacks
    # report ~10-13 ms per output token for Llama-2-7B fp16 at batch 1 on an A100.
    perf = LLMPerfModel.load("llama-2-7b", "a100")
    t = perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=512))
    assert 0.010 < t < 0.020
    assert perf.decode_step_s == perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=1024))
    # Batching is nearly free while weight-bound: 32 sequences cost far less than 32 x one.
    t32 = perf.step_time_s(BatchShape(decode_tokens=32, decode_context_tokens=32 * 512))
    assert t < t32 < 2 * t
    # H100 is faster; TP splits the weights.
    assert LLMPerfModel.load("llama-2-7b", "h100").decode_step_s < perf.decode_step_s
    assert LLMPerfModel.load("llama-2-7b", "a100", 2).decode_step_s < perf.decode_step_s


def test_kv_capacity_follows_the_memory_arithmetic() -> None:
    perf = LLMPerfModel.load("llama-2-7b", "a100")
    hw, m = load_hardware("a100"), load_model("llama-2-7b")
    expected = int((hw.memory_bytes * 0.9 - m.num_params * 2) // (2 * 32 * 32 * 128 * 2))
    assert perf.kv_capacity_tokens(0.9) == expected == 121_750
    assert perf.kv_capacity_tokens(0.5) < expected
    # TP 2 halves the weights per GPU and the KV bytes per token per GPU: more than twice the tokens.
    assert LLMPerfModel.load("llama-2-7b", "a100", 2).kv_capacity_tokens() > 2 * expected
    # GQA: llama-3-8b stores 4x fewer KV bytes per token than llama-2-7b.
    assert LLMPerfModel.load("llama-3-8b", "a100").kv_bytes_per_token_per_gpu() == 131072
    # KV heads replicate past TP = kv heads (8 for 70B): per-GPU bytes stop shrinking.
    k8 = LLMPerfModel.load("llama-2-70b", "a100", 8).kv_bytes_per_token_per_gpu()
    assert k8 == 327680 / 8
    with pytest.raises(ValueError, match=r"tensor_parallel \(fits: \[2, 4, 8\]\)"):
        LLMPerfModel.load("llama-2-70b", "a100", 1).kv_capacity_tokens()
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        perf.kv_capacity_tokens(1.5)


def test_embedding_batch_time_is_monotone_and_anchored() -> None:
    perf = EmbeddingPerfModel.load("bge-base", "a100")
    assert perf.batch_time_s(0, 0, 0) == 0.0
    assert perf.batch_time_s(8, 800, 100) < perf.batch_time_s(8, 1600, 200) < perf.batch_time_s(16, 3200, 200)
    assert perf.batch_time_s(8, 800, 100) <= perf.batch_time_s(8, 800, 400)  # longer max: more attention
    # Bigger encoders cost more; MiniLM (22M) < bge-base (110M) < bge-m3 (568M).
    costs = [
        EmbeddingPerfModel.load(m, "a100").batch_time_s(32, 32 * 256, 256)
        for m in ("all-minilm-l6-v2", "bge-base", "bge-m3")
    ]
    assert costs == sorted(costs)
    # NVIDIA's TensorRT BERT-base FP16 on A100: 16.14 ms for 128 x 128 tokens; TEI is estimated 1-2x slower.
    assert 1.0 < perf.batch_time_s(128, 128 * 128, 128) / 0.01614 < 2.0


def test_piecewise_linear_scalar_matches_vectorised_and_fit_is_monotone() -> None:
    import numpy as np

    x = np.arange(1, 4000, 7.0)
    y = 0.1 + np.maximum(0.0, x - 300) * 1e-3 + 0.002 * np.sin(x)
    curve = fit_hinges(x, y, (64, 256, 512, 1024))
    assert all(b >= a for a, b in zip(curve.ys, curve.ys[1:], strict=False))
    for v in (0.5, 1.0, 100.0, 333.3, 3999.0, 9000.0):
        assert curve(v) == pytest.approx(float(curve.evaluate(np.array([v]))[0]))
    assert float(np.mean(np.abs(curve.evaluate(x) - y) / y)) < 0.02
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseLinear((1.0, 1.0), (0.0, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------- fit error


def test_fit_error_against_vidur_is_within_the_documented_bounds(report: dict) -> None:
    s = report["summary"]
    assert len(report["vidur"]) == 20  # 5 files x 4 TP degrees
    assert s["vidur_mape_total_max"] < 6.0
    assert s["vidur_mape_op_max"] < 12.0
    assert s["roofline_mape_total_max"] < 12.0


def test_fit_error_against_splitwise_is_within_the_documented_bounds(report: dict) -> None:
    s = report["summary"]
    assert len(report["splitwise"]) == 6  # llama-2-70b x {a100, h100} x TP {2, 4, 8}
    assert s["splitwise_decode_mape_calibrated_max"] < 10.0
    assert s["splitwise_prefill_mape_calibrated_max"] < 25.0
    assert s["splitwise_decode_mape_heldout_tp_max"] < 15.0
    assert s["splitwise_prefill_mape_heldout_tp_max"] < 25.0
    # Calibration is what closes the gap to Splitwise's (higher-overhead) stack.
    assert s["splitwise_decode_mape_calibrated_max"] < s["splitwise_decode_mape_default_max"]


def test_shipped_calibration_files_are_the_fitted_ones(report: dict) -> None:
    for key, coef in report["calibration"].items():
        model, hw = key.split("/")
        data = yaml.safe_load((CAL_DIR / f"splitwise-{model}-{hw}.yaml").read_text())
        for name, value in coef.items():
            assert data[name] == pytest.approx(value, rel=1e-4), (key, name)


# ---------------------------------------------------------------------------------------------- calibration


def _write(tmp_path, name: str, data: dict | str):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_calibration_scales_and_overrides_as_specified(tmp_path) -> None:
    base = LLMPerfModel.load("llama-2-7b", "a100")
    b = BatchShape(
        prefill_tokens=512, decode_tokens=16, prefill_context_tokens=512, decode_context_tokens=8000, num_prefills=1
    )
    c0 = base.components(b)

    doubled = LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "s.yaml", {"scale": 2.0}))
    assert doubled.step_time_s(b) == pytest.approx(2 * base.step_time_s(b))

    over = LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "o.yaml", {"step_overhead_s": 0.011}))
    assert over.step_time_s(b) - base.step_time_s(b) == pytest.approx(0.010)  # the profile's default is 1 ms

    lin = LLMPerfModel.load(
        "llama-2-7b", "a100", calibration=_write(tmp_path, "l.json", json.dumps({"linear_scale": 1.5}))
    )
    assert lin.step_time_s(b) - base.step_time_s(b) == pytest.approx(0.5 * c0["operators"])

    att = LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "a.yaml", {"attention_scale": 3.0}))
    attention = c0["prefill_attention"] + c0["decode_attention"]
    assert att.step_time_s(b) - base.step_time_s(b) == pytest.approx(2.0 * attention)

    eff = LLMPerfModel.load(
        "llama-2-7b", "a100", calibration=_write(tmp_path, "e.yaml", {"decode_attention_efficiency": 0.3})
    )
    assert eff.components(b)["decode_attention"] == pytest.approx(2 * c0["decode_attention"])  # 0.6 -> 0.3

    meta = {"model": "llama-2-7b", "hardware": "a100", "source": "test", "notes": "metadata is accepted"}
    assert LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "m.yaml", meta)).step_time_s(
        b
    ) == base.step_time_s(b)


def test_calibration_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown calibration keys \['scael'\]; valid: .*'scale'"):
        LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "t.yaml", {"scael": 2}))
    with pytest.raises(ValueError, match="calibrated for hardware='h100'"):
        LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "h.yaml", {"hardware": "h100"}))
    with pytest.raises(ValueError, match="must be <= 1"):
        LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "f.yaml", {"allreduce_efficiency": 1.5}))
    with pytest.raises(ValueError, match="must be a number"):
        LLMPerfModel.load("llama-2-7b", "a100", calibration=_write(tmp_path, "n.yaml", {"scale": "big"}))
    with pytest.raises(ValueError, match="does not exist"):
        LLMPerfModel.load("llama-2-7b", "a100", calibration=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"unknown calibration keys \['linear_scale'\]"):
        EmbeddingPerfModel.load("bge-base", "a100", calibration=_write(tmp_path, "x.yaml", {"linear_scale": 2}))


def test_embedding_calibration(tmp_path) -> None:
    base = EmbeddingPerfModel.load("bge-base", "a100")
    cal = _write(tmp_path, "emb.yaml", {"scale": 1.5, "batch_overhead_s": 0.0})
    tuned = EmbeddingPerfModel.load("bge-base", "a100", calibration=cal)
    args = (4, 400, 100)
    overhead = load_hardware("a100").embedding.batch_overhead_s
    assert tuned.batch_time_s(*args) == pytest.approx(1.5 * (base.batch_time_s(*args) - overhead))


def test_splitwise_calibration_reproduces_splitwise_decode() -> None:
    cal = CAL_DIR / "splitwise-llama-2-70b-a100.yaml"
    perf = LLMPerfModel.load("llama-2-70b", "a100", 8, calibration=cal)
    measured = 0.0449  # Splitwise: Llama2-70B, A100, TP 8, batch 1, prompt 512: 44.9 ms per token
    assert perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=576)) == pytest.approx(measured, rel=0.15)
    with pytest.raises(ValueError, match="calibrated for model='llama-2-70b'"):
        LLMPerfModel.load("llama-2-7b", "a100", calibration=cal)


# ---------------------------------------------------------------------------------------------- command


def test_fit_command_prints_json_with_the_expected_keys(capsys, tmp_path) -> None:
    assert fit.main(["--json", "--write-calibration", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"vidur", "roofline", "splitwise", "calibration", "embedding", "summary"}
    row = out["vidur"][0]
    assert {"file", "tensor_parallel", "mape_ops", "mape_total", "roofline_mape_total"} <= set(row)
    assert set(row["mape_ops"]) >= {"attn_pre_proj", "mlp_up_proj", "mlp_down_proj", "add"}
    assert {"prefill_mape_default", "decode_mape_calibrated", "decode_mape_heldout_tp"} <= set(out["splitwise"][0])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["splitwise-llama-2-70b-a100.yaml", "splitwise-llama-2-70b-h100.yaml"]
    LLMPerfModel.load("llama-2-70b", "h100", 4, calibration=tmp_path / written[1])


def test_fit_command_text_output(capsys) -> None:
    assert fit.main([]) == 0
    text = capsys.readouterr().out
    assert "a100_Llama-2-7b-hf_mlp.csv" in text and "Splitwise" in text and "held-out TP" in text


def test_a_dense_decoder_from_its_hf_config_needs_no_profile(tmp_path):
    import json

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": 32000,
    }
    path = tmp_path / "llama-2-7b.config.json"
    path.write_text(json.dumps(cfg))
    from_config = LLMPerfModel.load(str(path), "h100")
    shipped = LLMPerfModel.load("llama-2-7b", "h100")
    assert from_config.model.num_params == shipped.model.num_params  # 6,738,415,616: the shapes add up
    assert from_config.model.kv_bytes_per_token == shipped.model.kv_bytes_per_token
    assert from_config.source == "roofline" and shipped.source == "vidur"
    for shape in (
        BatchShape(decode_tokens=16, decode_context_tokens=16 * 800),
        BatchShape(prefill_tokens=2048, prefill_context_tokens=2048, num_prefills=1),
    ):
        # The roofline fitted on the GPU's Vidur files lands near the measured operator curves.
        assert from_config.step_time_s(shape) == pytest.approx(shipped.step_time_s(shape), rel=0.25)
    cfg["num_local_experts"] = 8
    path.write_text(json.dumps(cfg))
    from sagesched.sim.perf.profiles import model_from_hf_config

    with pytest.raises(ValueError, match="mixture-of-experts"):
        model_from_hf_config(path)


def test_the_shipped_h100_calibration_applies_without_flags() -> None:
    from sagesched.sim.perf_model import DEFAULT_CALIBRATION_DIR

    calibrated = LLMPerfModel.load("llama-2-7b", "h100")
    plain = LLMPerfModel.load("llama-2-7b", "h100", calibration="none")
    assert calibrated.calibration_file == str(DEFAULT_CALIBRATION_DIR / "llama-2-7b-h100-tp1.yaml")
    assert plain.calibration_file is None
    assert calibrated.frontend_s(600, 10) > 0.005 and calibrated.decode_step_s != plain.decode_step_s
    assert LLMPerfModel.load("llama-2-7b", "a100").calibration_file is None  # only where one was fitted
