"""`sagesched calibrate`: fit coefficients from measured runs and write a calibration file.

    sagesched calibrate runs ../shared/calibration/vllm-h100-llama-2-7b --out my-h100.yaml

    sagesched calibrate llamacpp http://127.0.0.1:8001 --model gemma-3-270m --parallel 4 --out cpu.yaml

The first fits the hardware-level coefficients (`fit_runs.PARAMS`) on every unsaturated run in the folder,
reports the residuals and a leave-one-run-out cross-validation, and writes a calibration file that
`model.calibration=my-h100.yaml` (or an instance's `calibration:`) uses. The second probes a running
llama-server and writes a llama.cpp CPU calibration (`sagesched.calibrate.llamacpp_probe`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from sagesched.calibrate.fit_runs import fit_runs, residuals_for
from sagesched.calibrate.predict import profile_name
from sagesched.calibrate.runs import RunFormatError, find_runs


def calibration_document(runs, fit, cv: dict[str, dict[str, float]] | None) -> dict:
    """The calibration file's content: metadata, the coefficients, and how they were fitted."""
    first = runs[0]
    doc = {
        "model": profile_name(first.server.model),
        "hardware": first.hardware,
        "tensor_parallel": first.server.tensor_parallel,
        "source": f"sagesched calibrate runs {first.path.parent}",
        "notes": f"fitted on {', '.join(fit.training_runs)} by simulating each stage (scipy least_squares)",
    }
    doc.update({k: float(f"{v:.6g}") for k, v in fit.coefficients.items()})
    fit_info = {
        "training_runs": fit.training_runs,
        "rms_relative_error": round(fit.rms_relative_error(), 4),
        "residuals": {k: {s: round(v, 4) for s, v in st.items()} for k, st in fit.residuals.items()},
    }
    if cv is not None:
        fit_info["leave_one_run_out"] = {k: {s: round(v, 4) for s, v in st.items()} for k, st in cv.items()}
    doc["fit"] = fit_info
    return doc


def cmd_runs(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        print(
            f"sagesched calibrate: {args.folder} is not a folder; pass an inference-perf run folder (with "
            "exp-config.yaml) or a folder of them",
            file=sys.stderr,
        )
        return 2
    try:
        runs = find_runs(args.folder)
    except RunFormatError as exc:
        print(f"sagesched calibrate: {exc}", file=sys.stderr)
        return 2
    usable = [r for r in runs if not r.saturated]
    skipped = [r.name for r in runs if r.saturated]
    if skipped:
        print(f"skipping saturated runs (failed requests > 5%): {skipped}")
    if not usable:
        print("sagesched calibrate: no unsaturated run to fit", file=sys.stderr)
        return 2
    fit = fit_runs(usable, window_s=args.window, operators=args.operators)
    print(f"coefficients: {fit.coefficients}")
    print(f"in-sample RMS relative error: {fit.rms_relative_error():.3f} ({fit.evaluations} simulations of the runs)")
    cv: dict[str, dict[str, float]] | None = None
    if args.cv and len(usable) > 1:
        cv = {}
        for held in usable:
            sub = fit_runs([r for r in usable if r is not held], window_s=args.window, operators=args.operators)
            cv.update(residuals_for([held], sub.coefficients, args.window, 10.0, args.operators))
        errs = [abs(v) for st in cv.values() for v in st.values()]
        print(f"leave-one-run-out mean absolute relative error: {np.mean(errs):.3f}")
    doc = calibration_document(usable, fit, cv)
    if args.operators == "roofline":
        # The fit's operator scale is the GPU's roofline correction (`roofline_operator_scale`).
        doc["roofline_operator_scale"] = doc.pop("linear_scale", 1.0)
        doc.pop("model", None)  # hardware-level constants: usable with any model's config.json on this GPU
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sagesched calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("runs", help="fit to inference-perf run folders")
    r.add_argument("folder", type=Path, help="an inference-perf run folder, or a folder of them")
    r.add_argument("--out", type=Path, required=True, help="calibration file to write (YAML)")
    r.add_argument("--window", type=float, default=40.0, help="seconds of each stage simulated per evaluation")
    r.add_argument("--no-cv", dest="cv", action="store_false", help="skip the leave-one-run-out cross-validation")
    r.add_argument(
        "--operators",
        choices=("vidur", "roofline"),
        default="vidur",
        help="operator curves: the model's Vidur profile, or the roofline from the runs' model_config/*.config.json",
    )
    r.set_defaults(func=cmd_runs)
    try:
        from sagesched.calibrate import llamacpp_cli, probe

        probe.add_parser(sub)
        llamacpp_cli.add_parser(sub)
    except ImportError:  # the probes need httpx (a core dependency); keep `runs` usable regardless
        pass
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
