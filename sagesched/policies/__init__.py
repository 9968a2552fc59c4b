"""Scheduling policies: one contract (`Policy.schedule`, `Policy.next_wakeup`), many policies."""

from sagesched.policies.base import LoadLedger, Policy, PolicyConfig, reject_unservable
from sagesched.policies.registry import available_policies, config_fields, make_policy, policy_class, register

__all__ = [
    "LoadLedger",
    "Policy",
    "PolicyConfig",
    "available_policies",
    "config_fields",
    "make_policy",
    "policy_class",
    "register",
    "reject_unservable",
]
