from dataclasses import dataclass

import pytest

from bench import registry
from bench.errors import BenchError
from bench.registry import build_params, param


@dataclass(frozen=True)
class Example:
    scaling: float = param(0.3, "lambda", low=0.0, high=2.0)
    steps: int = param(10, "optimiser steps", low=1)
    mode: str = param("mean", "how to combine", choices=("mean", "sum"))
    adaptive: bool = param(True, "adaptive SAM")


def test_defaults_and_typed_parsing():
    p = build_params("m", Example, {})
    assert (p.scaling, p.steps, p.mode, p.adaptive) == (0.3, 10, "mean", True)
    p = build_params("m", Example, {"scaling": "0.5", "steps": "3", "mode": "sum", "adaptive": "false"})
    assert (p.scaling, p.steps, p.mode, p.adaptive) == (0.5, 3, "sum", False)
    assert isinstance(p.steps, int) and isinstance(p.scaling, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scalng": "1"}, "unknown parameter of m 'scalng'; did you mean: scaling?"),
        ({"scaling": "abc"}, "m.scaling='abc' is not a valid float; default is 0.3"),
        ({"scaling": "3"}, "m.scaling=3.0 is outside [0.0, 2.0]"),
        ({"steps": "1.5"}, "m.steps='1.5' is not a valid int; default is 10"),
        ({"steps": "0"}, "m.steps=0 is outside [1, None]"),
        ({"mode": "max"}, "m.mode=max is not one of mean|sum"),
        ({"adaptive": "maybe"}, "m.adaptive='maybe' is not a valid bool; default is true"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, message):
    with pytest.raises(BenchError) as info:
        build_params("m", Example, overrides)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_unknown_method_lists_close_matches():
    with pytest.raises(BenchError, match=r"^unknown method 'tie'; did you mean: ties"):
        registry.get_method("tie")
    with pytest.raises(BenchError, match=r"^unknown suite 'tiny9'; did you mean: tiny8"):
        registry.get_suite("tiny9")


def test_every_method_declares_family_data_and_documented_params():
    specs = registry.methods()
    expected = {"pretrained", "individual", "weight_averaging", "task_arithmetic", "ties", "dare_ta", "dare_ties",
                "consensus_ta", "tsv_m", "iso_c", "iso_cts"}
    assert expected <= set(specs)
    for name, spec in specs.items():
        assert spec.family in registry.FAMILIES, name
        assert spec.data in registry.DATA_ACCESS, name
        assert spec.description, name
        spec.params()  # every field has a default
        for info in registry.param_infos(spec.params):
            assert info.help, f"{name}.{info.name} has no help text"
            registry.parse_value(name, info, info.default)  # the default passes its own validation


def test_reference_defaults_from_methods_md():
    def defaults(name):
        return registry.params_dict(registry.get_method(name).params())

    assert defaults("task_arithmetic")["scaling"] == 0.3
    ties = defaults("ties")
    assert ties["k"] == 20 and ties["scaling"] == 0.3 and ties["trim_scope"] == "global"
    assert defaults("iso_cts")["common_space_fraction"] == 0.8
    assert defaults("iso_c")["alpha"] == 1.0
    assert defaults("tsv_m")["alpha"] == 1.0
