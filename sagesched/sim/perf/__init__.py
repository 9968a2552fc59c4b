"""Building blocks of the performance model (`sagesched.sim.perf_model` is the public face).

One idea per module: `profiles` reads the YAML hardware/model profiles, `piecewise` is the fast
piecewise-linear curve and its least-squares fit, `operators` turns Vidur's per-operator timings (or a
roofline where none were measured) into one step-time curve, `calibration` reads coefficient files.
"""
