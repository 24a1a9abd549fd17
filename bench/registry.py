"""Registries of merging methods and suites.

A method module declares itself with one decorator::

    @dataclass(frozen=True)
    class TiesParams:
        k: float = param(20.0, "percent of each task vector's entries kept", low=0, high=100)
        scaling: float = param(0.3, "lambda applied to the merged task vector")

    @register_method("ties", family="data-free", params=TiesParams,
                     description="Trim, elect sign, disjoint merge (Yadav et al. 2023)")
    def merge(ctx: MergeContext, p: TiesParams) -> StateDict: ...

Hyperparameters are typed dataclass fields with visible defaults; ``bench list methods``
prints them and ``--set ties.k=10`` parses against the field's type and bounds.
Suites register the same way with :func:`register_suite`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.errors import BenchError, unknown_name_error

FAMILIES = ("reference", "data-free", "test-time", "data-using")
DATA_ACCESS = ("none", "unlabeled", "labeled")


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """A hyperparameter field: default, one-line help, optional choices or closed bounds."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "low": low, "high": high}
    )


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    low: float | None
    high: float | None

    def describe(self) -> str:
        text = f"{self.name}={format_value(self.default)}"
        if self.choices:
            text += " {" + "|".join(str(c) for c in self.choices) + "}"
        return text


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def param_infos(params_cls: type) -> list[ParamInfo]:
    hints = typing.get_type_hints(params_cls)
    infos = []
    for f in dataclasses.fields(params_cls):
        meta = f.metadata
        infos.append(
            ParamInfo(
                name=f.name,
                type=hints[f.name],
                default=f.default,
                help=meta.get("help", ""),
                choices=meta.get("choices"),
                low=meta.get("low"),
                high=meta.get("high"),
            )
        )
    return infos


def parse_value(owner: str, info: ParamInfo, raw: Any) -> Any:
    """Convert a command-line string (or an already-typed value) to the field's type and check it."""
    where = f"{owner}.{info.name}"
    try:
        if info.type is bool:
            if isinstance(raw, bool):
                value = raw
            else:
                lowered = str(raw).strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
        elif info.type is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            value = int(raw) if not isinstance(raw, str) else int(raw.strip())
        elif info.type is float:
            value = float(raw)
        else:
            value = info.type(raw)
    except (TypeError, ValueError):
        raise BenchError(
            f"{where}={raw!r} is not a valid {info.type.__name__}; default is {format_value(info.default)}"
        ) from None
    if info.choices is not None and value not in info.choices:
        options = "|".join(str(c) for c in info.choices)
        raise BenchError(f"{where}={format_value(value)} is not one of {options}")
    if (info.low is not None and value < info.low) or (info.high is not None and value > info.high):
        raise BenchError(f"{where}={format_value(value)} is outside [{info.low}, {info.high}]")
    return value


def build_params(owner: str, params_cls: type, overrides: Mapping[str, Any]) -> Any:
    """Instantiate ``params_cls`` from defaults plus ``overrides`` (name -> raw value)."""
    infos = {info.name: info for info in param_infos(params_cls)}
    values = {}
    for name, raw in overrides.items():
        if name not in infos:
            raise unknown_name_error(f"parameter of {owner}", name, infos)
        values[name] = parse_value(owner, infos[name], raw)
    try:
        return params_cls(**values)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise BenchError(f"{owner}: {exc}") from None


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


@dataclass(frozen=True)
class NoParams:
    """For methods and suites without hyperparameters."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    data: str
    params: type
    description: str
    fn: Callable[..., Any]
    budget: Callable[[Any], int] | None = None

    def samples_per_task(self, params: Any) -> int:
        return self.budget(params) if self.budget else 0


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    params: type
    description: str
    fn: Callable[..., Any]
    # readiness(params, cache_dir) -> one line per artefact still missing from the cache (empty: ready here).
    readiness: Callable[[Any, Any], list[str]] | None = None
    # prepare(params, cache_dir, progress): download and verify everything the suite needs (connected machine).
    prepare: Callable[[Any, Any, bool], None] | None = None

    def missing(self, params: Any, cache_dir: Any) -> list[str]:
        return self.readiness(params, cache_dir) if self.readiness else []


_METHODS: dict[str, MethodSpec] = {}
_SUITES: dict[str, SuiteSpec] = {}


def register_method(
    name: str,
    *,
    family: str,
    description: str,
    params: type = NoParams,
    data: str = "none",
    budget: Callable[[Any], int] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx, params) -> StateDict | PerTaskWeights`` under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if data not in DATA_ACCESS:
        raise ValueError(f"data must be one of {DATA_ACCESS}, got {data!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = MethodSpec(name, family, data, params, description, fn, budget)
        return fn

    return decorator


def register_suite(
    name: str,
    *,
    description: str,
    params: type = NoParams,
    readiness: Callable[[Any, Any], list[str]] | None = None,
    prepare: Callable[[Any, Any, bool], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(params, cache_dir, progress) -> MergeProblem`` under ``name``.

    Suites built offline need neither ``readiness`` nor ``prepare``; suites whose checkpoints or datasets come
    from a hub give both (``bench doctor`` / ``bench list suites`` and ``bench prepare`` call them).
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _SUITES and _SUITES[name].fn is not fn:
            raise ValueError(f"suite {name!r} registered twice")
        _SUITES[name] = SuiteSpec(name, params, description, fn, readiness, prepare)
        return fn

    return decorator


def _import_package_modules(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package_name}.{module.name}")


def methods() -> dict[str, MethodSpec]:
    _import_package_modules("methods")
    return dict(_METHODS)


def suites() -> dict[str, SuiteSpec]:
    _import_package_modules("suites")
    return dict(_SUITES)


def get_method(name: str) -> MethodSpec:
    registry = methods()
    if name not in registry:
        raise unknown_name_error("method", name, registry)
    return registry[name]


def get_suite(name: str) -> SuiteSpec:
    if name.endswith(".toml") or name.startswith("custom:"):  # a suite file (suites/custom.py), never listed
        from suites.custom import file_suite

        return file_suite(name)
    registry = suites()
    if name not in registry:
        raise unknown_name_error("suite", name, registry)
    return registry[name]
