"""The interface between suites and methods.

A suite builds a :class:`MergeProblem`; a method receives a :class:`MergeContext` wrapping it and
returns merged weights. Methods never import suites and suites never import methods.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


class PerTaskWeights(dict):
    """A method result that is not one model: task name -> the weights evaluated on that task.

    Used by the ``individual`` reference row (each expert on its own task).
    """


@dataclass
class TaskMetrics:
    """The score of one model on one task's evaluation split."""

    accuracy: float  # in [0, 1]
    loss: float  # mean cross-entropy
    correct: Tensor  # bool [num_examples], in the split's fixed order

    @property
    def num_examples(self) -> int:
        return int(self.correct.numel())


class MergeProblem(abc.ABC):
    """What a suite gives the runner: weights to merge, forward, data and evaluation.

    Only ``pretrained()``'s keys are merged; anything else (heads, frozen parts) stays inside the suite.
    """

    name: str
    tasks: list[str]
    protocol: str = "transductive"
    # Torch threads for a job on the CPU (None: torch's default). Tiny models run fastest on one thread, and
    # multi-threaded torch slows down many-fold when another process holds a core.
    cpu_threads: int | None = None

    @abc.abstractmethod
    def pretrained(self) -> StateDict:
        """θ0: the weights that get merged (CPU tensors; callers must not modify them in place)."""

    @abc.abstractmethod
    def expert(self, task: str) -> StateDict:
        """θ_task, same keys and shapes as :meth:`pretrained` (callers must not modify in place)."""

    def experts(self) -> list[StateDict]:
        return [self.expert(task) for task in self.tasks]

    @abc.abstractmethod
    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        """Functional forward of the merged model followed by ``task``'s fixed head."""

    def logits_per_task(self, params: StateDict, batches: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's logits on its own batch: ``{task: logits(params, task, batches[task])}``.

        Suites whose tasks share the merged trunk and differ only in their heads override this to run the trunk
        once over the concatenated batches: one forward (and backward) instead of K in the λ-optimising loops.
        """
        return {task: self.logits(params, task, inputs) for task, inputs in batches.items()}

    @abc.abstractmethod
    def unlabeled(self, task: str, n: int, seed: int) -> Tensor:
        """``n`` unlabeled inputs of ``task``, drawn with ``seed`` from the protocol's adaptation split."""

    def unlabeled_size(self, task: str) -> int:
        """How many distinct examples :meth:`unlabeled` can draw for ``task`` under the protocol."""
        raise NotImplementedError(f"{type(self).__name__} does not say how much unlabeled data it has")

    @abc.abstractmethod
    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` labeled (inputs, labels) of ``task`` from its training/validation data."""

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        """For every merged weight ``W`` of a linear map ``y = x Wᵀ + b``: its inputs ``x`` as [N, in_features].

        Used by RegMean. Suites that cannot expose them leave this as is and RegMean is skipped with a reason.
        """
        from bench.errors import MethodNotApplicable

        raise MethodNotApplicable(f"suite {self.name} does not expose the inputs of its linear layers")

    @abc.abstractmethod
    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        """Score ``params`` on ``task``'s test split."""

    def describe(self) -> dict:
        """Facts about the built problem for records (sizes, split lengths)."""
        return {}


@dataclass
class MergeContext:
    """What a method's registered function receives besides its hyperparameters."""

    problem: MergeProblem
    seed: int
    device: torch.device
    generator: torch.Generator = field(repr=False)
    timer: Any = field(default=None, repr=False)  # bench.measure.PhaseTimer; None outside the runner
    progress: bool = False  # show progress bars for long loops
    shared: dict = field(default_factory=dict, repr=False)  # lives across the jobs of one run or sweep
    notes: dict = field(default_factory=dict)  # method may record diagnostics (e.g. chosen thresholds)

    @property
    def tasks(self) -> list[str]:
        return self.problem.tasks

    def pretrained(self) -> StateDict:
        return self.problem.pretrained()

    def experts(self) -> list[StateDict]:
        return self.problem.experts()

    def memo(self, key: tuple, factory: Callable[[], Any]) -> Any:
        """``factory()`` once per run or sweep for ``key`` (e.g. the task-vector stack reused across grid points).

        Only for values that depend on nothing but ``key`` and the problem; never for seeded random draws
        unless the seed is part of the key.
        """
        if key not in self.shared:
            self.shared[key] = factory()
        return self.shared[key]

    def adapt_phase(self) -> contextlib.AbstractContextManager:
        """Wrap test-time optimisation in this so the runner reports it as the `adapt` phase."""
        return self.timer.phase("adapt") if self.timer is not None else contextlib.nullcontext()


def check_compatible(base: StateDict, experts: Sequence[StateDict], names: Sequence[str]) -> None:
    """Fail before any work when an expert's keys or shapes differ from the base, naming the first."""
    from bench.errors import BenchError

    for name, expert in zip(names, experts, strict=True):
        missing = [k for k in base if k not in expert]
        extra = [k for k in expert if k not in base]
        if missing or extra:
            key = (missing or extra)[0]
            where = "missing from" if missing else "not in the base but in"
            raise BenchError(f"tensor '{key}' is {where} expert '{name}'; experts must share the base architecture")
        for key, tensor in base.items():
            if expert[key].shape != tensor.shape:
                raise BenchError(
                    f"expert '{name}' tensor '{key}' has shape {tuple(expert[key].shape)}, "
                    f"base has {tuple(tensor.shape)}; experts must be fine-tuned from the same base"
                )


def iter_task_vectors(base: StateDict, experts: Sequence[StateDict]) -> Iterator[StateDict]:
    """τ_i = θ_i − θ0, one expert at a time (never all K at once)."""
    for expert in experts:
        yield {k: expert[k] - v for k, v in base.items()}
