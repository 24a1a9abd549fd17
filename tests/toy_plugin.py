"""A test-only suite: three linear 'tasks' whose experts are known exactly, fast enough for every test.

Registered as `toy` when imported (tests import it directly; subprocesses get it through BENCH_PLUGINS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.problem import MergeProblem, StateDict, TaskMetrics
from bench.registry import param, register_suite

DIM = 6


@dataclass(frozen=True)
class ToyParams:
    num_tasks: int = param(3, "number of tasks", low=1, high=6)
    eval_delay: float = param(0.0, "seconds to sleep per evaluated task (to test interruption)", low=0.0)
    protocol: str = param("transductive", "where unlabeled data is drawn from", choices=("transductive", "inductive"))


class ToyProblem(MergeProblem):
    def __init__(self, params: ToyParams):
        self.name = "toy"
        self.params = params
        self.protocol = params.protocol
        self.tasks = [f"t{i}" for i in range(params.num_tasks)]
        g = torch.Generator().manual_seed(1234)
        self._base = {"w": torch.randn(DIM, DIM, generator=g) * 0.3, "b": torch.zeros(DIM)}
        self._experts = {
            task: {"w": self._base["w"] + torch.randn(DIM, DIM, generator=g), "b": torch.randn(DIM, generator=g) * 0.1}
            for task in self.tasks
        }
        self._test = {task: torch.randn(200, DIM, generator=g) for task in self.tasks}
        self._pool = {task: torch.randn(200, DIM, generator=g) for task in self.tasks}

    def pretrained(self) -> StateDict:
        return self._base

    def expert(self, task: str) -> StateDict:
        return self._experts[task]

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        return inputs @ params["w"].T + params["b"]

    def _labels(self, task: str, inputs: Tensor) -> Tensor:
        return self.logits(self._experts[task], task, inputs).argmax(-1)

    def _adaptation_inputs(self, task: str) -> Tensor:
        return self._test[task] if self.protocol == "transductive" else self._pool[task]

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        size = len(self._adaptation_inputs(task))
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        return self._adaptation_inputs(task)[indices]

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        return {"w": inputs}

    def unlabeled_size(self, task: str) -> int:
        return 200

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        inputs = self._pool[task][torch.randperm(200, generator=torch.Generator().manual_seed(seed))[:n]]
        return inputs, self._labels(task, inputs)

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        if self.params.eval_delay:
            time.sleep(self.params.eval_delay)
        inputs = self._test[task]
        labels = self._labels(task, inputs)
        logits = self.logits(params, task, inputs)
        correct = logits.argmax(-1) == labels
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        return TaskMetrics(accuracy=correct.float().mean().item(), loss=loss, correct=correct)


@register_suite("toy", description="test-only linear suite", params=ToyParams)
def build(params: ToyParams, cache_dir: Path, progress: bool) -> ToyProblem:
    return ToyProblem(params)


# A toy suite that needs "downloaded" artefacts, to test readiness, `bench prepare`, `bench doctor` and the
# missing-artefact error without a hub: prepare writes the files that `download` would have fetched.
TOY_HUB_FILES = ("toy/base.pt", "toy/data.pt")


def toy_hub_missing(params: ToyParams, cache_dir: Path, needs: object) -> list[str]:
    from suites._hub import is_complete

    return [f"artefact {name}" for name in TOY_HUB_FILES if not is_complete(Path(cache_dir) / "toyhub" / name)]


def toy_hub_prepare(params: ToyParams, cache_dir: Path, progress: bool, needs: object) -> None:
    from suites._hub import fetch

    for name in TOY_HUB_FILES:
        fetch(Path(cache_dir) / "toyhub" / name, lambda folder: (folder / "payload.bin").write_bytes(b"x" * 16))


@register_suite("toyhub", description="test-only suite that needs prepared artefacts", params=ToyParams,
                readiness=toy_hub_missing, prepare=toy_hub_prepare)
def build_hub(params: ToyParams, cache_dir: Path, progress: bool) -> ToyProblem:
    return ToyProblem(params)
