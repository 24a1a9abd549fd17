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

from bench.model_pool import ModelPool

StateDict = dict[str, Tensor]


class PerTaskWeights(dict):
    """A method result that is not one model: task name -> the weights evaluated on that task (a state dict, or
    a function building it, so that K models need not exist at once: TALL masks and EMR keep one shared task
    vector and K bit masks and build each task's weights when it is evaluated).

    ``per_task_bytes``: what each task adds to the shared model (its masks, its layer, a whole model for the
    ``individual`` row), recorded for the cost table; None when unknown.
    """

    def __init__(self, weights: Mapping[str, Any], per_task_bytes: int | None = None) -> None:
        super().__init__(weights)
        self.per_task_bytes = per_task_bytes

    def for_task(self, task: str) -> Mapping[str, Tensor]:
        """The weights ``task`` is evaluated on (built now when given as a function)."""
        weights = self[task]
        return weights() if callable(weights) else weights


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
    # 2-D parameters (fnmatch patterns) that the SVD-based methods merge as plain vectors rather than matrices:
    # the CLIP suites name the text projection, as the TSV and Iso reference code treat it.
    vector_params: tuple[str, ...] = ()

    @abc.abstractmethod
    def pretrained(self) -> Mapping[str, Tensor]:
        """θ0: the weights that get merged (CPU tensors; callers must not modify them in place).

        A state dict, or a :class:`bench.model_pool.Weights` reader that reads one tensor at a time.
        """

    @abc.abstractmethod
    def expert(self, task: str) -> Mapping[str, Tensor]:
        """θ_task, same keys and shapes as :meth:`pretrained` (callers must not modify in place).

        Suites with real checkpoints return a reader over the files, so that merging K experts never holds K
        whole models in memory.
        """

    def experts(self) -> list[Mapping[str, Tensor]]:
        return [self.expert(task) for task in self.tasks]

    def model_pool(self) -> ModelPool:
        """The base and every expert as readers, in task order."""
        return ModelPool(self.pretrained(), {task: self.expert(task) for task in self.tasks})

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
    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        """Positions (int64 [n]) of ``n`` distinct examples of ``task``'s adaptation split under the protocol,
        drawn with ``seed``; a smaller ``n`` with the same seed gives a prefix of a larger draw.

        Only positions: the inputs are gathered batch by batch with :meth:`unlabeled_inputs`, so an adaptation
        pool costs 8 bytes per example in memory however large the examples are.
        """

    @abc.abstractmethod
    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        """Model inputs of the adaptation split's examples at ``indices``, in that order (one batch, read from
        the suite's stored examples and preprocessed now)."""

    def unlabeled_size(self, task: str) -> int:
        """How many distinct examples :meth:`unlabeled_indices` can draw for ``task`` under the protocol."""
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

    def pretrained(self) -> Mapping[str, Tensor]:
        return self.problem.pretrained()

    def experts(self) -> list[Mapping[str, Tensor]]:
        return self.problem.experts()

    def memo(self, key: tuple, factory: Callable[[], Any]) -> Any:
        """``factory()`` once per run or sweep for ``key`` (e.g. the task-vector stack reused across grid points).

        Only for values that depend on nothing but ``key`` and the problem; never for seeded random draws
        unless the seed is part of the key.
        """
        if key not in self.shared:
            self.shared[key] = factory()
        return self.shared[key]

    def note_held(self, what: str, tensors: Any) -> None:
        """Record in the run's notes the bytes a ``stacked`` method holds at once (``tensors``: a tensor, or
        nested lists/dicts of them, or an object with ``nbytes``)."""
        self.notes.setdefault("held_bytes", {})[what] = held_bytes(tensors)

    def adapt_phase(self) -> contextlib.AbstractContextManager:
        """Wrap test-time optimisation in this so the runner reports it as the `adapt` phase."""
        return self.timer.phase("adapt") if self.timer is not None else contextlib.nullcontext()


def iter_task_vectors(base: StateDict, experts: Sequence[StateDict]) -> Iterator[StateDict]:
    """τ_i = θ_i − θ0, one expert at a time (never all K at once)."""
    for expert in experts:
        yield {k: expert[k] - v for k, v in base.items()}


def held_bytes(tensors: Any) -> int:
    """Total bytes of the tensors in ``tensors`` (a tensor, a mapping or sequence of them, or has ``nbytes``)."""
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, Mapping):
        return sum(held_bytes(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(held_bytes(value) for value in tensors)
    return int(tensors.nbytes)
