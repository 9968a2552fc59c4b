"""`sagesched calibrate`: fit the performance model's coefficients to measurements of real servers.

Modules: `runs` (measured runs and their workloads), `predict` (replay a run through the simulator),
`fit_runs` (scipy least squares over simulated runs), `report` (leave-one-out fidelity report),
`cli` (the command).
"""
