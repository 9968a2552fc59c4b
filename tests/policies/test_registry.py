"""The registry: every policy by name, errors that list the valid choices, documented configs."""

from __future__ import annotations

import dataclasses

import pytest

from sagesched.core import Assignment
from sagesched.policies import Policy, available_policies, config_fields, make_policy, policy_class

NINE = ["fifo", "priority", "slo_aware", "adaptive", "hybrid", "round_robin", "random", "least_loaded", "power_of_two"]


def test_all_nine_names_are_registered():
    assert set(NINE) <= set(available_policies())
    assert available_policies() == sorted(available_policies())


@pytest.mark.parametrize("name", NINE)
def test_make_policy_builds_a_working_policy(name, make_request, make_view, check_decisions):
    policy = make_policy(name)
    assert isinstance(policy, Policy) and policy.name == name and type(policy) is policy_class(name)
    queue = [make_request("r1"), make_request("r2", arrival_s=0.1), make_request("lost", model="nope")]
    instances = [make_view("a"), make_view("b")]
    decisions = policy.schedule(1.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert rejected == ["lost"]
    # Work an idle pool can take right away is not left waiting, except behind a batch window.
    assert sorted(assigned) == ["r1", "r2"] or policy.next_wakeup(1.0) is not None
    assert policy.describe()["name"] == name


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown policy 'hybird'") as err:
        make_policy("hybird")
    for name in NINE:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="available: "):
        policy_class("FIFO")  # names are exact: no silent fallback to another policy


@pytest.mark.parametrize("name", NINE)
def test_unknown_config_key_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match=f"invalid config for policy '{name}': unknown config key 'bogus_knob'") as err:
        make_policy(name, bogus_knob=1)
    message = str(err.value)
    fields = config_fields(name)
    assert all(f in message for f in fields)
    if not fields:
        assert "(none)" in message


def test_invalid_config_values_are_value_errors_naming_the_policy():
    with pytest.raises(ValueError, match=r"invalid config for policy 'priority'.*aging_interval_s"):
        make_policy("priority", aging_interval_s=0)
    with pytest.raises(ValueError, match=r"invalid config for policy 'adaptive'.*exit_load"):
        make_policy("adaptive", enter_load=0.5, exit_load=0.9)


@pytest.mark.parametrize(
    "name, key, value, words",
    [
        ("hybrid", "embedding_batch_size", "lots", "must be a whole number"),
        ("slo_aware", "shed_unattainable", "maybe", "must be true or false"),
        ("fifo", "head_of_line_blocking", 1, "must be true or false"),
        ("hybrid", "llm_holdback_ms", "fast", "must be a number"),
    ],
)
def test_wrong_config_types_name_the_field_and_the_policy(name, key, value, words):
    """Policy configs go through the typed config layer: a wrong type is caught when the policy is
    built, at its field, not later as an obscure comparison error inside a schedule call."""
    from sagesched.typed_config import ConfigFieldError

    with pytest.raises(ConfigFieldError, match=f"invalid config for policy '{name}': {words}") as err:
        make_policy(name, **{key: value})
    assert err.value.path == (key,)


def test_config_overrides_reach_the_policy():
    assert make_policy("random", seed=5).config.seed == 5
    assert make_policy("slo_aware", shed_unattainable=True).describe()["shed_unattainable"] is True
    policy = make_policy("fifo", head_of_line_blocking=True)
    assert policy.config.head_of_line_blocking is True


@pytest.mark.parametrize("name", available_policies())
def test_every_config_field_is_documented(name):
    cls = policy_class(name).Config
    doc = cls.__doc__ or ""
    undocumented = [f.name for f in dataclasses.fields(cls) if f.name not in doc]
    assert not undocumented, f"{cls.__name__} docstring does not document {undocumented}"


def test_assignments_name_their_rule(make_request, make_view):
    for name in NINE:
        for d in make_policy(name).schedule(0.0, [make_request("r")], [make_view("a")]):
            if isinstance(d, Assignment):
                assert d.rule.split("/")[0] == name
