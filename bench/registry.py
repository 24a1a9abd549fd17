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
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic

from bench.errors import BenchError, unknown_name_error

FAMILIES = ("reference", "data-free", "test-time", "data-using")
DATA_ACCESS = ("none", "unlabeled", "labeled")
CAPABILITIES = {
    "class_logits": "per-class logits of the merged model on a task's inputs (a forward to optimise through)",
    "unlabeled_data": "unlabeled inputs of each task (the protocol's adaptation split)",
    "labeled_data": "labeled examples of each task (a training split)",
    "linear_inputs": "the inputs of every merged linear layer on given examples",
}
"""What a suite can give a method besides its weights; methods declare which they need (``needs``)."""
MEMORY = {
    "streamed": "reads the experts one tensor at a time: one merged model + K × the largest tensor",
    "stacked": "holds all K task vectors (or per-expert statistics) at once on the run's device",
}
OUTPUTS = {
    "merged": "one merged model for every task",
    "per_task": "one set of weights per task: a shared model plus a small per-task part (masks, a layer, ...)",
}
"""What a method's result is (``output=`` of :func:`register_method`); reports mark ``per_task`` rows."""


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    finite: bool = True,
) -> Any:
    """A hyperparameter field: default, one-line help, optional choices or closed bounds.

    A float must be finite (``nan``, ``inf`` and ``-inf`` are refused) unless ``finite=False``.
    """
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "low": low, "high": high, "finite": finite}
    )


def require_choice(method: str, name: str, value: object, choices: Sequence[object]) -> None:
    """ValueError for a hyperparameter outside its choices, saying what to set instead."""
    if value not in choices:
        options = "|".join(str(choice) for choice in choices)
        raise ValueError(
            f"{method}.{name}={value!r} is not one of {options}; e.g. --set {method}.{name}={choices[0]}"
        )


def require_range(method: str, name: str, value: float, low: float | None, high: float | None) -> None:
    """ValueError for a hyperparameter outside the closed range [low, high] (NaN is in no range)."""
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{method}.{name}={value} is outside [{low}, {high}]; pick a value in that range")


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    low: float | None
    high: float | None
    finite: bool = True  # a float value must be finite

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
                finite=meta.get("finite", True),
            )
        )
    return infos


@functools.cache
def _adapters(info: ParamInfo) -> tuple[pydantic.TypeAdapter, pydantic.TypeAdapter]:
    """The field's pydantic validators: its type alone, and its type with every declared constraint (bounds,
    finiteness, choices), both from the one declaration in :func:`param`."""
    constraints: dict[str, Any] = {}
    if info.low is not None:
        constraints["ge"] = info.low
    if info.high is not None:
        constraints["le"] = info.high
    if info.type is float:
        constraints["allow_inf_nan"] = not info.finite
    checks: list[Any] = [pydantic.Field(**constraints)]
    if info.choices is not None:
        choices = info.choices

        def among_choices(value: Any) -> Any:
            if value not in choices:
                raise ValueError("not a choice")
            return value

        checks.append(pydantic.AfterValidator(among_choices))
    config = pydantic.ConfigDict(coerce_numbers_to_str=True)
    return (pydantic.TypeAdapter(info.type, config=config),
            pydantic.TypeAdapter(Annotated[(info.type, *checks)], config=config))


def parse_value(owner: str, info: ParamInfo, raw: Any) -> Any:
    """Convert a command-line string (or an already-typed value) to the field's type and check its declared
    constraints (pydantic validates; its errors become the one-line messages below)."""
    where = f"{owner}.{info.name}"
    plain, constrained = _adapters(info)
    try:
        return constrained.validate_python(raw)
    except pydantic.ValidationError as exc:
        kind = exc.errors()[0]["type"]
    try:
        value = plain.validate_python(raw)
    except pydantic.ValidationError:
        value = None
    if kind == "finite_number":
        raise BenchError(f"{where}={format_value(value)} is not a finite number; default is "
                         f"{format_value(info.default)}") from None
    if kind == "value_error" and info.choices is not None:
        options = "|".join(str(c) for c in info.choices)
        raise BenchError(f"{where}={format_value(value)} is not one of {options}") from None
    if kind in ("greater_than_equal", "less_than_equal"):
        raise BenchError(f"{where}={format_value(value)} is outside [{info.low}, {info.high}]") from None
    raise BenchError(
        f"{where}={raw!r} is not a valid {info.type.__name__}; default is {format_value(info.default)}"
    ) from None


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
    memory: str = "streamed"
    needs: tuple[str, ...] = ()  # CAPABILITIES the suite must have for the method to apply
    output: str = "merged"  # OUTPUTS: one model, or one set of weights per task (bench.problem.PerTaskWeights)

    def samples_per_task(self, params: Any) -> int:
        return self.budget(params) if self.budget else 0


@dataclass(frozen=True)
class DataNeeds:
    """What the selected methods read besides each task's scored split. A suite maps it to the splits it fetches
    and checks: labeled examples come from a train split, and so does the unlabeled pool of an inductive protocol."""

    labeled: bool = True  # some method reads labeled examples (data="labeled": Fisher, RegMean)
    unlabeled: bool = True  # some method reads unlabeled inputs (data="unlabeled": the test-time methods)

    @classmethod
    def of(cls, specs: Iterable[MethodSpec]) -> DataNeeds:
        access = {spec.data for spec in specs}
        return cls(labeled="labeled" in access, unlabeled="unlabeled" in access)

    def train_split(self, protocol: str) -> bool:
        """Whether a suite whose inductive pool is its train split needs that split under ``protocol``."""
        return self.labeled or (self.unlabeled and protocol == "inductive")


ALL_DATA = DataNeeds()  # every method may run: what `bench prepare` fetches by default
SCORED_SPLITS_ONLY = DataNeeds(labeled=False, unlabeled=False)  # what every method needs


@dataclass(frozen=True)
class ArtefactSize:
    """One artefact of a suite and its size: on disk once prepared, else what the hub says ``prepare`` fetches."""

    description: str  # as readiness names it
    present_bytes: int | None  # bytes in the cache when prepared; None when it is (completely) missing
    expected_bytes: int | None  # hub size of the files prepare fetches; None when unknown (offline, by hand)
    scratch_bytes: int = 0  # temporary space prepare needs beside it while converting (a dataset's download)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    params: type
    description: str
    fn: Callable[..., Any]
    # readiness(params, cache_dir, needs) -> one line per artefact still missing from the cache (empty: ready here);
    # ``needs`` (DataNeeds) says which optional splits count.
    readiness: Callable[[Any, Any, DataNeeds], list[str]] | None = None
    # prepare(params, cache_dir, progress, needs): download and verify what the suite needs (connected machine).
    prepare: Callable[[Any, Any, bool, DataNeeds], None] | None = None
    # sizes(params, cache_dir, needs, online) -> ArtefactSize per artefact; ``online`` may ask the hub for sizes.
    sizes: Callable[[Any, Any, DataNeeds, bool], list[ArtefactSize]] | None = None
    # capabilities(params) -> the CAPABILITIES this configuration has, known before anything is loaded.
    capabilities: Callable[[Any], Iterable[str]] = lambda params: tuple(CAPABILITIES)

    def lacks(self, params: Any, method: MethodSpec) -> list[str]:
        """The capabilities ``method`` needs that this suite configuration cannot give (empty: it applies)."""
        have = set(self.capabilities(params))
        return [need for need in method.needs if need not in have]

    def missing(self, params: Any, cache_dir: Any, needs: DataNeeds = ALL_DATA) -> list[str]:
        return self.readiness(params, cache_dir, needs) if self.readiness else []

    def run_prepare(self, params: Any, cache_dir: Any, progress: bool, needs: DataNeeds = ALL_DATA) -> None:
        if self.prepare is not None:
            self.prepare(params, cache_dir, progress, needs)

    def artefact_sizes(self, params: Any, cache_dir: Any, needs: DataNeeds, online: bool) -> list[ArtefactSize]:
        return self.sizes(params, cache_dir, needs, online) if self.sizes else []


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
    memory: str = "streamed",
    needs: tuple[str, ...] = (),
    output: str = "merged",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx, params) -> StateDict | PerTaskWeights`` under ``name``.

    ``output`` (:data:`OUTPUTS`): ``merged`` methods return one state dict; ``per_task`` ones a
    :class:`bench.problem.PerTaskWeights` (each task evaluated on its own weights, the per-task storage recorded).

    ``memory`` declares what the method holds at once (:data:`MEMORY`): ``streamed`` methods read the experts
    tensor by tensor; ``stacked`` ones keep every task vector (or per-expert statistics) on the device.
    ``needs`` lists the suite :data:`CAPABILITIES` it uses; the runner skips it, with the reason, on a suite
    that lacks one, before loading anything.
    """
    unknown = [need for need in needs if need not in CAPABILITIES]
    if unknown:
        raise ValueError(f"needs: unknown capability {unknown[0]!r}; known: {', '.join(CAPABILITIES)}")
    if memory not in MEMORY:
        raise ValueError(f"memory must be one of {tuple(MEMORY)}, got {memory!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if data not in DATA_ACCESS:
        raise ValueError(f"data must be one of {DATA_ACCESS}, got {data!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {tuple(OUTPUTS)}, got {output!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = MethodSpec(name, family, data, params, description, fn, budget, memory, tuple(needs),
                                    output)
        return fn

    return decorator


def register_suite(
    name: str,
    *,
    description: str,
    params: type = NoParams,
    readiness: Callable[[Any, Any, DataNeeds], list[str]] | None = None,
    prepare: Callable[[Any, Any, bool, DataNeeds], None] | None = None,
    sizes: Callable[[Any, Any, DataNeeds, bool], list[ArtefactSize]] | None = None,
    capabilities: Iterable[str] | Callable[[Any], Iterable[str]] = tuple(CAPABILITIES),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(params, cache_dir, progress) -> MergeProblem`` under ``name``.

    ``capabilities`` (:data:`CAPABILITIES`, or a function of the suite's parameters giving them) says what the
    suite can give methods besides weights; by default all of them.

    Suites built offline need neither ``readiness`` nor ``prepare``; suites whose checkpoints or datasets come
    from a hub give both (``bench doctor`` / ``bench list suites`` and ``bench prepare`` call them), and ``sizes``
    for the expected and used disk space (``bench prepare`` prints and checks it, ``bench doctor`` shows it).
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _SUITES and _SUITES[name].fn is not fn:
            raise ValueError(f"suite {name!r} registered twice")
        _SUITES[name] = SuiteSpec(name, params, description, fn, readiness, prepare, sizes,
                                  capabilities_of(capabilities))
        return fn

    return decorator


def capabilities_of(declared: Iterable[str] | Callable[[Any], Iterable[str]]) -> Callable[[Any], tuple[str, ...]]:
    """A suite's declaration as a function of its parameters, checked against :data:`CAPABILITIES`."""
    def checked(values: Iterable[str]) -> tuple[str, ...]:
        values = tuple(values)
        unknown = [value for value in values if value not in CAPABILITIES]
        if unknown:
            raise ValueError(f"capabilities: unknown {unknown[0]!r}; known: {', '.join(CAPABILITIES)}")
        return values

    if callable(declared):
        return lambda params: checked(declared(params))
    fixed = checked(declared)
    return lambda params: fixed


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


def methods_reading(data: str) -> list[str]:
    """The registered methods with this data access (``DATA_ACCESS``), by name."""
    return sorted(name for name, spec in methods().items() if spec.data == data)


def register_suite_resolver(claims: Callable[[str], bool], resolve: Callable[[str], SuiteSpec]) -> None:
    """Let a plugin answer suite names no registered suite has (e.g. a suite file's path): ``resolve(name)`` for
    every name ``claims(name)`` accepts. Such suites are never listed."""
    _SUITE_RESOLVERS.append((claims, resolve))


_SUITE_RESOLVERS: list[tuple[Callable[[str], bool], Callable[[str], SuiteSpec]]] = []


def get_suite(name: str) -> SuiteSpec:
    registry = suites()  # imports every suite module, so their resolvers are registered too
    for claims, resolve in _SUITE_RESOLVERS:
        if claims(name):
            return resolve(name)
    if name not in registry:
        raise unknown_name_error("suite", name, registry)
    return registry[name]
