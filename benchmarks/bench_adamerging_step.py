"""Layer-wise AdaMerging, seconds per optimisation step: ours (``adamerging_lw``) against FusionBench's.

Run in the benchmark-only tox env that installs FusionBench beside the harness (FusionBench is never a
dependency of the harness itself)::

    tox -e peers-adamerging                                   # quick: 2 warm-up + 5 timed steps each (~4 min)
    tox -e peers-adamerging -- --warmup 5 --steps 10          # the issue's protocol (~7 min at 96 px, 1 thread)
    .tox/peers-adamerging/bin/python benchmarks/bench_adamerging_step.py --help

Workload, built once from ``--seed``: open_clip's CLIP ViT-B/32 image encoder (random weights, no hub; 152
parameter tensors, 87.8M entries) at ``--image-size`` px instead of 224 so that a CPU step takes seconds;
8 experts = base + small Gaussian perturbations (std ``--perturbation`` x the tensor's RMS); per task a random
zero-shot head (unit-norm class embeddings, logit scale 100, the TA8 class counts); random images,
``--batch-size`` per task per step. λ starts at 0.3 (one per expert per tensor), Adam lr 1e-3.

What runs on each side (nothing of FusionBench is reimplemented here; the only FusionBench-side code written
here is the two hooks its abstract ``LayerWiseAdaMergingAlgorithm`` leaves to subclasses):

- ours: the loss closure of ``methods/adamerging.py`` itself (captured by running the registered method with
  its ``optimise_lambdas`` intercepted), i.e. ``TaskVectorStack.merge`` (``bench/lambda_merge.py``), one
  encoder pass over all tasks' batches (``ClipClassificationProblem.logits_per_task``), mean entropy, then
  ``optimise_lambdas``' step: ``plain_gradient``, Adam, clamp to [0, 1].
- theirs: ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel`` around the same encoder,
  driven by a subclass of ``fusion_bench.method.adamerging.layer_wise_adamerging.LayerWiseAdaMergingAlgorithm``
  with FusionBench's CLIP config defaults (``clamp_weights=false, tie_weights=true, strict=false``). Its
  ``compute_logits`` hook is the open_clip one of FusionBench's ``OpenCLIPClassificationMixin`` (zero-shot
  ``ClassificationHead(normalize=True)`` applied to the encoder's output; that mixin itself cannot be
  imported on Python 3.11, see below). One step = the body of its ``test_time_adaptation`` loop: per task
  ``compute_logits``, FusionBench's ``entropy_loss``, ``fabric.backward(loss, retain_graph=True)``; then
  ``optimizer.step()``, ``zero_grad()``, ``merge_weights()``.

Timing: ``--warmup`` + ``--steps`` steps of each, in turn (who goes first rotates every step), in one process
under one torch thread count (default 1: on a shared machine, OpenMP workers waiting on each other whenever
another process holds a core inflate the thousands of small ops of FusionBench's merge several-fold, far more
than ours, so multi-threaded ratios there measure the neighbours); wall seconds (``perf_counter``) and CPU
seconds of the process (``process_time``, which excludes waiting for a CPU another process holds), median and
best. A third contender, the *encoder floor*, times what any λ-optimising step must do anyway: one forward and
backward of the encoder over all tasks' batches with gradients for every tensor (no merge, no λ); the table
also gives ours/theirs for the time each spends above it. glibc is told to keep freed memory (as in
``bench_merge_speed.py``) so that neither side's big temporaries pay fresh page faults every step. Then, as a
check that the driven steps are what each library's own loop costs, ``--loop-steps`` steps of each whole loop:
ours through the registered ``adamerging_lw`` function (its recorded ``seconds_per_step``), theirs through
``test_time_adaptation`` (time between the starts of consecutive steps, seen by its data iterator).

Agreement checks: the step-0 loss of both (per task and the mean over tasks; FusionBench sums the per-task
gradients where ours averages the losses, so its gradient is K times ours), the step-0 gradient (theirs / K
against ours, tensor by tensor), and λ after the timed steps (Adam is invariant to that factor K up to its
eps; ours clamps λ to [0, 1], FusionBench's clip.yaml does not, and this close to 0.3 the clamp never binds).

FusionBench 0.2.31-0.2.33: ``fusion_bench.modelpool.openclip_vision`` does ``from typing import override``
(Python >= 3.12) while the package declares Python >= 3.10, so ``OpenCLIPClassificationMixin`` fails to import
on 3.11; the classes used here do not import it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness, when run from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from suites._torchvision_compat import ensure_torchvision_importable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge_speed import steady_allocator  # noqa: E402

# TA8 class counts: SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD.
TASK_CLASSES = {"sun397": 397, "cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10,
                "dtd": 47}
LOGIT_SCALE = math.log(100.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96, help="input side in px (multiple of 32; CLIP: 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per task per step (AdaMerging: 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each, in turn")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each, in turn")
    parser.add_argument("--loop-steps", type=int, default=2,
                        help="steps of each library's own whole loop as a cross-check (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, both sides (default 1: on a shared machine OpenMP workers that wait on "
                             "each other inflate the many small ops of FusionBench's merge several-fold)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturbation", type=float, default=0.05,
                        help="expert = base + N(0, (this x tensor RMS)^2)")
    parser.add_argument("--init", type=float, default=0.3, help="initial λ (both sides)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both sides)")
    parser.add_argument("--no-steady-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (default: pin them, as bench_merge_speed.py)")
    args = parser.parse_args(argv)
    if args.loop_steps == 1 or args.steps < 1:
        parser.error("--loop-steps must be 0 or at least 2 (a step is timed from its start to the next's), "
                     "--steps at least 1")
    return args


# ------------------------------------------------------------------------------------------------------------
# The shared workload
# ------------------------------------------------------------------------------------------------------------


def build_encoder(image_size: int) -> torch.nn.Module:
    ensure_torchvision_importable()
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_image_size=image_size)
    return model.visual.eval()  # the text tower is dropped with ``model``


def make_expert(base: dict[str, torch.Tensor], task_index: int, seed: int, scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1000 + task_index + 1)
    expert = {}
    for key, tensor in base.items():
        rms = float(tensor.float().pow(2).mean().sqrt())
        std = scale * max(rms, 1e-2)
        expert[key] = tensor + torch.empty(tensor.shape).normal_(0.0, std, generator=generator)
    return expert


def build_problem(encoder: torch.nn.Module, args: argparse.Namespace, images_per_task: int):
    from suites._clip_classification import ClipClassificationProblem, ClipHead, DataSplit, TaskData
    from suites._clip_weights import OpenClipImageEncoder

    generator = torch.Generator().manual_seed(args.seed)
    heads, data = {}, {}
    for task, classes in TASK_CLASSES.items():
        heads[task] = ClipHead(F.normalize(torch.randn(classes, encoder.output_dim, generator=generator), dim=-1),
                               LOGIT_SCALE)
        images = torch.randn(images_per_task, 3, args.image_size, args.image_size, generator=generator)
        data[task] = TaskData(tuple(f"class {i}" for i in range(classes)),
                              {"test": DataSplit(images, torch.zeros(images_per_task, dtype=torch.long))})
    wrapped = OpenClipImageEncoder(encoder)  # parameter names "visual.*", as the vit suites' open_clip source
    base = {f"visual.{k}": v.detach().clone() for k, v in encoder.state_dict().items()}
    tasks = list(TASK_CLASSES)

    def expert_loader(task: str) -> dict[str, torch.Tensor]:
        return make_expert(base, tasks.index(task), args.seed, args.perturbation)

    return ClipClassificationProblem(name="peers-adamerging", encoder=wrapped, pretrained=base,
                                     expert_loader=expert_loader, heads=heads, data=data)


# ------------------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------------------


class Ours:
    """``methods/adamerging.py``'s loss closure and ``bench/adaptation.py``'s step, one step per call."""

    def __init__(self, problem, stack, args: argparse.Namespace, total_steps: int):
        import methods.adamerging as adamerging
        from bench.adaptation import plain_gradient
        from bench.problem import MergeContext

        self.problem, self.stack, self.args = problem, stack, args
        self.ctx = MergeContext(problem=problem, seed=args.seed, device=torch.device("cpu"),
                                generator=torch.Generator().manual_seed(args.seed),
                                shared={("task_vectors", "cpu"): stack})
        self.params = adamerging.AdaMergingParams(init=args.init, lr=args.lr, steps=total_steps,
                                                  batch_size=args.batch_size, clamp=True)
        captured = {}

        def capture(ctx, loss_fn, initial, **kwargs):
            captured.update(loss_fn=loss_fn, initial=initial, **kwargs)
            return initial

        # Run the registered method up to its optimiser loop, keeping the loss closure and the data it built.
        with mock.patch.object(adamerging, "optimise_lambdas", capture):
            adamerging.merge_layer_wise(self.ctx, self.params)
        self.loss_fn: Callable = captured["loss_fn"]
        self.clamp = captured["clamp"]
        self.gradient = plain_gradient(self.loss_fn)
        self.lambdas = captured["initial"].detach().clone().requires_grad_(True)
        self.optimiser = torch.optim.Adam([self.lambdas], lr=captured["lr"])
        self.first_grad: torch.Tensor | None = None

    def step(self, index: int) -> float:
        loss, grad = self.gradient(self.lambdas, index)
        if self.first_grad is None:
            self.first_grad = grad.detach().clone()
        self.optimiser.zero_grad(set_to_none=True)
        self.lambdas.grad = grad
        self.optimiser.step()
        if self.clamp is not None:
            with torch.no_grad():
                self.lambdas.clamp_(*self.clamp)
        return float(loss)

    def per_task_losses(self, lambdas: torch.Tensor, index: int, batch) -> dict[str, float]:
        from methods.adamerging import entropy_loss

        with torch.no_grad():
            logits = self.problem.logits_per_task(self.stack.merge(lambdas),
                                                  {t: batch(t, index) for t in self.problem.tasks})
        return {task: float(entropy_loss(value)) for task, value in logits.items()}

    def whole_loop_seconds_per_step(self, steps: int) -> float:
        """The registered ``adamerging_lw`` end to end for ``steps`` steps; its own per-step record."""
        import methods.adamerging as adamerging
        from bench.problem import MergeContext

        ctx = MergeContext(problem=self.problem, seed=self.args.seed, device=torch.device("cpu"),
                           generator=torch.Generator().manual_seed(self.args.seed),
                           shared={("task_vectors", "cpu"): self.stack})
        params = adamerging.AdaMergingParams(init=self.args.init, lr=self.args.lr, steps=steps,
                                             batch_size=self.args.batch_size, clamp=True)
        adamerging.merge_layer_wise(ctx, params)
        return float(ctx.notes["seconds_per_step"])


# ------------------------------------------------------------------------------------------------------------
# Theirs
# ------------------------------------------------------------------------------------------------------------


def make_theirs_algorithm(args: argparse.Namespace, tasks: list[str], heads: dict, batch):
    from fusion_bench.method.adamerging.layer_wise_adamerging import LayerWiseAdaMergingAlgorithm
    from fusion_bench.models.open_clip import ClassificationHead
    from omegaconf import DictConfig

    class OpenClipLayerWiseAdaMerging(LayerWiseAdaMergingAlgorithm):
        """FusionBench's layer-wise AdaMerging with its two abstract hooks filled for in-memory data."""

        def __init__(self, config: DictConfig) -> None:
            super().__init__(config)
            self.zero_shot_heads = {  # the same heads as ours: scale x unit-norm class embeddings, no bias
                task: ClassificationHead(normalize=True, weights=math.exp(head.logit_scale) * head.class_embeddings)
                .requires_grad_(False)
                for task, head in heads.items()
            }
            self.iterators: dict[str, Iterator] = {}
            self.step_starts: list[float] = []

        def get_shuffled_test_loader_iter(self, task: str) -> Iterator:
            if task not in self.iterators:
                def batches(task=task):
                    index = 0
                    while True:
                        if task == tasks[0]:
                            self.step_starts.append(time.perf_counter())
                        yield (batch(task, index),)
                        index += 1

                self.iterators[task] = batches()
            return self.iterators[task]

        def compute_logits(self, module, images, task):  # as FusionBench's OpenCLIPClassificationMixin
            return self.zero_shot_heads[task](module(images))

    # FusionBench's fusion_bench_config/method/adamerging/clip.yaml, with this run's init, lr and steps.
    config = DictConfig({"name": "clip_layer_wise_adamerging", "weights": None, "optimizer": "adam", "lr": args.lr,
                         "init_values": args.init, "clamp_weights": False, "tie_weights": True, "strict": False,
                         "max_steps": args.loop_steps, "batch_size": args.batch_size, "num_workers": 0})
    algorithm = OpenClipLayerWiseAdaMerging(config)
    algorithm.modelpool = type("Pool", (), {"model_names": list(tasks)})()
    return algorithm


class Theirs:
    """One iteration of FusionBench's ``test_time_adaptation`` loop per call, on its own wrapper and loss."""

    def __init__(self, algorithm, module, args: argparse.Namespace, tasks: list[str], batch):
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss

        self.algorithm, self.raw_module, self.tasks, self.batch = algorithm, module, tasks, batch
        self.entropy_loss = entropy_loss
        optimizer = torch.optim.Adam([module.merge_weight], lr=args.lr)
        self.module, self.optimizer = algorithm.fabric.setup(module, optimizer)
        self.module.train()
        self.module.merge_weights()
        self.first_losses: dict[str, float] | None = None
        self.first_grad: torch.Tensor | None = None

    def step(self, index: int) -> float:
        losses = {}
        for task in self.tasks:
            logits = self.algorithm.compute_logits(self.module, self.batch(task, index), task)
            loss = self.entropy_loss(logits)
            self.algorithm.fabric.backward(loss, retain_graph=True)
            losses[task] = float(loss)
        if self.first_losses is None:
            self.first_losses = losses
            self.first_grad = self.raw_module.merge_weight.grad.detach().clone()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.module.merge_weights()
        return float(loss)

    def whole_loop_seconds_per_step(self, init: float) -> float:
        """FusionBench's ``test_time_adaptation`` for ``config.max_steps`` steps from λ = ``init``."""
        with torch.no_grad():
            self.raw_module.merge_weight.fill_(init)
        self.algorithm.step_starts.clear()
        self.algorithm.test_time_adaptation(self.raw_module)
        starts = self.algorithm.step_starts
        return (starts[-1] - starts[0]) / (len(starts) - 1)


def build_theirs_module(encoder: torch.nn.Module, problem, args: argparse.Namespace):
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    pretrained = copy.deepcopy(encoder)
    finetuned = []
    for task in problem.tasks:
        expert = {k.removeprefix("visual."): v for k, v in problem.expert(task).items()}
        model = copy.deepcopy(encoder)
        model.load_state_dict(expert, assign=True)
        finetuned.append(model)
        del expert
    num_layers = len([p for p in pretrained.parameters() if p.requires_grad])
    weights = get_layer_wise_weights(num_models=len(finetuned), num_layers=num_layers, init_values=args.init)
    # As LayerWiseAdaMergingAlgorithm.construct_layer_wise_merged_model, with clip.yaml's options.
    return LayerWiseMergedModel(layer_wise_weight=weights, pretrained_model=pretrained, finetuned_models=finetuned,
                                clamp_weights=False, tie_weights=True, strict=False)


# ------------------------------------------------------------------------------------------------------------


class EncoderFloor:
    """What any λ-optimising step must at least do: one forward and backward of the encoder over all tasks'
    batches with gradients for every merged tensor (no merge, no λ). Both implementations do this work; what
    each adds on top of it is its merge machinery and how it batches the tasks."""

    def __init__(self, problem, stack, batch):
        self.problem, self.batch = problem, batch
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in stack.base.items()}

    def step(self, index: int) -> float:
        from methods.adamerging import entropy_loss

        logits = self.problem.logits_per_task(self.params, {t: self.batch(t, index) for t in self.problem.tasks})
        loss = torch.stack([entropy_loss(value) for value in logits.values()]).mean()
        torch.autograd.grad(loss, list(self.params.values()))
        return float(loss)


# ------------------------------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable[[int], float], index: int) -> tuple[float, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn(index)
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steady = False if args.no_steady_allocator else steady_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from bench.adaptation import UnlabeledBatches
    from bench.lambda_merge import TaskVectorStack

    ensure_torchvision_importable()
    import fusion_bench

    fb_version = getattr(fusion_bench, "__version__", None)
    if fb_version is None:
        from importlib.metadata import version

        fb_version = version("fusion-bench")

    total_steps = args.warmup + args.steps
    setup = time.perf_counter()
    encoder = build_encoder(args.image_size)
    problem = build_problem(encoder, args, images_per_task=max(total_steps, args.loop_steps) * args.batch_size)
    tasks = problem.tasks

    stack = TaskVectorStack(problem.pretrained(), problem.experts(), "cpu")
    gc.collect()
    ours = Ours(problem, stack, args, total_steps)
    # Theirs reads the batches ours draws: the registered method's UnlabeledBatches, rebuilt with its arguments.
    batch = UnlabeledBatches(problem, total_steps * args.batch_size, args.batch_size, args.seed,
                             torch.device("cpu")).batch

    theirs_module = build_theirs_module(encoder, problem, args)
    gc.collect()
    algorithm = make_theirs_algorithm(args, tasks, problem.heads, batch)
    theirs = Theirs(algorithm, theirs_module, args, tasks, batch)
    floor = EncoderFloor(problem, stack, batch)
    torch.set_num_threads(args.threads)  # in case the Fabric set-up changed it
    setup = time.perf_counter() - setup
    print(f"set-up {setup:.1f} s; peak RSS so far {peak_rss_gib():.1f} GiB; fusion-bench {fb_version}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    # The λ columns: ours follows TaskVectorStack.keys, theirs the encoder's named_parameters; compare by name.
    ours_names = [k.removeprefix("visual.") for k in stack.keys]
    theirs_names = [n for n, _ in theirs_module.task_vectors[0].named_parameters()]
    if sorted(ours_names) != sorted(theirs_names):
        raise SystemExit("the two implementations have λ columns for different tensors")
    as_ours = torch.tensor([theirs_names.index(name) for name in ours_names])

    ours_losses_0 = ours.per_task_losses(ours.lambdas.detach(), 0, batch)

    contenders = [("ours", ours.step), ("theirs", theirs.step), ("floor", floor.step)]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in contenders}
    step_loss: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for index in range(total_steps):
        shift = index % len(contenders)  # each goes first, second and last in turn
        for name, fn in contenders[shift:] + contenders[:shift]:
            if torch.get_num_threads() != args.threads:
                raise SystemExit(f"torch thread count changed to {torch.get_num_threads()}")
            wall, cpu, loss = timed(fn, index)
            step_loss[name].append(loss)
            if index >= args.warmup:
                rows[name].append((wall, cpu))
            print(f"  step {index:2d} {'(warm-up)' if index < args.warmup else '         '} {name:6s} "
                  f"{wall:7.3f} s wall {cpu:7.3f} s cpu", flush=True)

    K = len(tasks)
    lambda_gap = (ours.lambdas.detach() - theirs_module.merge_weight.detach()[:, as_ours]).abs()
    # Adam's step is g / (sqrt(v) + eps): where |g| is near eps (1e-8) the factor K between the two gradients
    # (and float noise in near-zero gradients) changes the step; elsewhere both take the same step.
    resolved = ours.first_grad.abs() >= 1e-6
    grad_ours, grad_theirs = ours.first_grad, theirs.first_grad[:, as_ours] / K
    grad_rel = float((grad_ours - grad_theirs).norm() / grad_ours.norm())
    theirs_losses_0 = theirs.first_losses

    loop_ours = loop_theirs = None
    if args.loop_steps > 0:
        print(f"whole loops, {args.loop_steps} steps each ...", flush=True)
        loop_theirs = theirs.whole_loop_seconds_per_step(args.init)
        loop_ours = ours.whole_loop_seconds_per_step(args.loop_steps)

    def stat(name: str, column: int, how: Callable) -> float:
        return how([row[column] for row in rows[name]])

    columns = [("median wall", 0, statistics.median), ("best wall", 0, min), ("median CPU", 1, statistics.median),
               ("best CPU", 1, min)]
    print()
    print(f"Layer-wise AdaMerging, seconds per step: open_clip ViT-B/32 image encoder (87.8M params, "
          f"{len(stack.keys)} tensors), {K} experts, λ [{K} x {len(stack.keys)}]")
    print(f"image size {args.image_size} px, batch {args.batch_size} per task ({K * args.batch_size} images per "
          f"step), torch threads {args.threads}, {args.warmup} warm-up + {args.steps} timed steps each, in turn; "
          f"fusion-bench {fb_version}, torch {torch.__version__}")
    print()
    print("| s/step | " + " | ".join(title for title, _, _ in columns) + " | whole loop |")
    print("|---" * (len(columns) + 2) + "|")
    labels = {"ours": "ours (adamerging_lw)", "theirs": "theirs (FusionBench)", "floor": "encoder floor"}
    loops = {"ours": loop_ours, "theirs": loop_theirs, "floor": None}
    for name, label in labels.items():
        loop = f"{loops[name]:.3f}" if loops[name] is not None else "-"
        print(f"| {label} | " + " | ".join(f"{stat(name, c, how):.3f}" for _, c, how in columns) + f" | {loop} |")
    ratios = [stat("ours", c, how) / stat("theirs", c, how) for _, c, how in columns]
    loop_ratio = f"{loop_ours / loop_theirs:.3f}" if loop_ours is not None else "-"
    print("| ours / theirs | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {loop_ratio} |")
    above = [(stat("ours", c, how) - stat("floor", c, how)) / (stat("theirs", c, how) - stat("floor", c, how))
             for _, c, how in columns]
    print("| ours / theirs above the floor | " + " | ".join(f"{r:.3f}" for r in above) + " | - |")
    verdict = "met" if ratios[0] <= 0.5 else "NOT met"
    print(f"target ours <= 0.5 x theirs (median wall {ratios[0]:.3f}, best wall {ratios[1]:.3f}, median CPU "
          f"{ratios[2]:.3f}): {verdict}")
    print()
    mean_ours = statistics.mean(ours_losses_0.values())
    mean_theirs = statistics.mean(theirs_losses_0.values())
    print(f"step-0 loss at λ = {args.init}: ours {mean_ours:.6f} (mean over tasks; the loss ours optimises: "
          f"{step_loss['ours'][0]:.6f}), theirs {mean_theirs:.6f} (mean of its per-task losses), "
          f"|difference| {abs(mean_ours - mean_theirs):.2e}")
    worst = max(tasks, key=lambda t: abs(ours_losses_0[t] - theirs_losses_0[t]))
    print(f"  per task, largest |difference| {abs(ours_losses_0[worst] - theirs_losses_0[worst]):.2e} ({worst}); "
          + ", ".join(f"{t} {ours_losses_0[t]:.4f}/{theirs_losses_0[t]:.4f}" for t in tasks))
    print(f"step-0 gradient: ||ours - theirs/{K}|| / ||ours|| = {grad_rel:.2e} (theirs sums the per-task losses)")
    print(f"λ after {total_steps} steps: max |ours - theirs| = {float(lambda_gap.max()):.2e} over all "
          f"{lambda_gap.numel()}, {float(lambda_gap[resolved].max()):.2e} over the {int(resolved.sum())} with "
          f"|step-0 gradient| >= 1e-6; ours in [{float(ours.lambdas.min()):.4f}, {float(ours.lambdas.max()):.4f}]")
    print(f"peak RSS {peak_rss_gib():.1f} GiB; glibc malloc thresholds pinned: {steady}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
