"""Tests of the embedded tiny8 suite and the shared CLIP-classification machinery, on the ``ci`` build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError
from bench.model_pool import check_compatible
from bench.problem import MergeProblem
from bench.registry import build_params, get_suite
from suites import tiny8
from suites._clip_classification import ClipClassificationProblem, read_artifacts

CPU = torch.device("cpu")


def build_ci(cache_dir: Path, protocol: str = "transductive") -> ClipClassificationProblem:
    problem = tiny8.build(tiny8.Tiny8Params(size="ci", protocol=protocol), cache_dir, progress=False)
    assert isinstance(problem, ClipClassificationProblem)
    return problem


def cache_directory(cache_dir: Path) -> Path:
    (directory,) = [path for path in cache_dir.iterdir() if path.name.startswith("tiny8-")]
    return directory


@pytest.fixture(scope="module")
def ci_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real ci build shared by the module's tests (they only read it or copy it)."""
    cache_dir = tmp_path_factory.mktemp("tiny8-cache")
    build_ci(cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def problem(ci_cache: Path) -> ClipClassificationProblem:
    return build_ci(ci_cache)


def all_tensors(problem: ClipClassificationProblem) -> dict[str, torch.Tensor]:
    tensors = {f"pretrained/{key}": value for key, value in problem.pretrained().items()}
    for task in problem.tasks:
        tensors.update({f"expert/{task}/{key}": value for key, value in problem.expert(task).items()})
        tensors[f"head/{task}"] = problem.heads[task].class_embeddings
        for split_name, split in problem.data[task].splits.items():
            tensors[f"data/{task}/{split_name}/images"] = split.images
            tensors[f"data/{task}/{split_name}/labels"] = split.labels
    return tensors


def test_registered_with_typed_params() -> None:
    spec = get_suite("tiny8")
    params = build_params("tiny8", spec.params, {"size": "ci", "build_seed": "3", "protocol": "inductive"})
    assert params == tiny8.Tiny8Params(size="ci", build_seed=3, protocol="inductive")
    with pytest.raises(BenchError, match="not one of"):
        build_params("tiny8", spec.params, {"size": "huge"})


def test_ci_build_is_deterministic(problem: ClipClassificationProblem, tmp_path: Path) -> None:
    again = all_tensors(build_ci(tmp_path))
    first = all_tensors(problem)
    assert first.keys() == again.keys()
    different = [key for key in first if not torch.equal(first[key], again[key])]
    assert different == []


def test_build_seed_changes_the_build(problem: ClipClassificationProblem) -> None:
    pools = tiny8.load_digit_pools(1)
    other = tiny8.make_task_split("shapes", 16, torch.Generator().manual_seed(1), 16, pools["train"])
    assert not torch.equal(other.images, problem.split("shapes", "train").images[:16])
    assert tiny8.cache_key(tiny8.PRESETS["ci"], 0) != tiny8.cache_key(tiny8.PRESETS["ci"], 1)


def test_cache_hit_loads_without_rebuilding(
    problem: ClipClassificationProblem, ci_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a valid cache must not be rebuilt")

    monkeypatch.setattr(tiny8, "build_artifacts", no_build)
    loaded = all_tensors(build_ci(ci_cache))
    assert all(torch.equal(value, loaded[key]) for key, value in all_tensors(problem).items())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("target", "damage"),
    [
        ("expert-shapes.safetensors", _truncate),
        ("data.safetensors", _flip_byte),
        ("heads.safetensors", Path.unlink),
        ("manifest.json", lambda path: path.write_text("{not json")),
        ("manifest.json", Path.unlink),
    ],
    ids=["truncated", "bad-checksum", "missing-file", "bad-json", "missing-manifest"],
)
def test_corrupt_cache_is_rebuilt_with_one_warning_line(
    ci_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    damage: object,
) -> None:
    shutil.copytree(ci_cache, tmp_path, dirs_exist_ok=True)
    directory = cache_directory(tmp_path)
    files, metadata = read_artifacts(cache_directory(ci_cache))
    builds = []

    def fast_rebuild(*args: object, **kwargs: object) -> tuple[dict, dict]:
        builds.append(args)  # the real build is exercised by the determinism test; here only the flow
        return files, metadata

    monkeypatch.setattr(tiny8, "build_artifacts", fast_rebuild)
    damage(directory / target)  # type: ignore[operator]
    capsys.readouterr()

    problem = build_ci(tmp_path)

    err = capsys.readouterr().err
    assert len(builds) == 1
    assert err.count("\n") == 1 and "tiny8 cache" in err and "rebuilding" in err and "Traceback" not in err
    read_artifacts(directory)  # the rewritten cache verifies again
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]  # no staging leftovers
    assert problem.evaluate(problem.pretrained(), "digits", CPU).num_examples == len(
        problem.split("digits", "test")
    )
    capsys.readouterr()
    build_ci(tmp_path)
    assert len(builds) == 1 and capsys.readouterr().err == ""


def test_manifest_lists_checksums_of_every_file(ci_cache: Path) -> None:
    directory = cache_directory(ci_cache)
    manifest = json.loads((directory / "manifest.json").read_text())
    stored = {path.name for path in directory.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == stored
    assert manifest["build_version"] == tiny8.BUILD_VERSION and manifest["build_seed"] == 0


def test_experts_share_the_pretrained_open_clip_structure(problem: ClipClassificationProblem) -> None:
    base = problem.pretrained()
    check_compatible(base, problem.experts(), problem.tasks)
    for key in [
        "conv1.weight",
        "class_embedding",
        "positional_embedding",
        "ln_pre.weight",
        "proj",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.attn.out_proj.bias",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.mlp.c_proj.weight",
        "transformer.resblocks.0.ln_2.bias",
        "ln_post.weight",
    ]:
        assert key in base
    width = base["class_embedding"].shape[0]
    assert base["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    for task in problem.tasks:
        expert = problem.expert(task)
        assert any(not torch.equal(expert[key], base[key]) for key in base)


def test_experts_beat_pretrained_on_their_own_tasks(problem: ClipClassificationProblem) -> None:
    base, gaps = problem.pretrained(), []
    for task in problem.tasks:
        expert_accuracy = problem.evaluate(problem.expert(task), task, CPU).accuracy
        pretrained_accuracy = problem.evaluate(base, task, CPU).accuracy
        assert expert_accuracy > pretrained_accuracy, task
        gaps.append(expert_accuracy - pretrained_accuracy)
    assert sum(gaps) / len(gaps) > 0.15


def test_evaluate_is_consistent(problem: ClipClassificationProblem) -> None:
    metrics = problem.evaluate(problem.expert("colours"), "colours", CPU)
    test = problem.split("colours", "test")
    assert metrics.correct.dtype == torch.bool and metrics.num_examples == len(test)
    assert metrics.accuracy == pytest.approx(float(metrics.correct.float().mean()))
    assert 0.0 < metrics.loss < 50.0
    logits = problem.logits(problem.expert("colours"), "colours", problem.inputs("colours", "test"))
    assert torch.equal(metrics.correct, logits.argmax(dim=-1) == test.labels)  # the split's fixed order
    small_batches = ClipClassificationProblem(
        name=problem.name,
        encoder=problem.encoder,
        pretrained=problem.pretrained(),
        expert_loader=problem.expert,
        heads=problem.heads,
        data=problem.data,
        prepare=tiny8.prepare_images,
        eval_batch_size=7,
    )
    again = small_batches.evaluate(problem.expert("colours"), "colours", CPU)
    assert torch.equal(again.correct, metrics.correct) and again.loss == pytest.approx(metrics.loss, rel=1e-5)


def test_logits_use_the_given_weights_strictly(problem: ClipClassificationProblem) -> None:
    inputs = problem.inputs("shapes", "test")[:8]
    base_logits = problem.logits(problem.pretrained(), "shapes", inputs)
    assert base_logits.shape == (8, len(tiny8.TASK_CLASSES["shapes"]))
    assert not torch.allclose(base_logits, problem.logits(problem.expert("shapes"), "shapes", inputs))
    incomplete = dict(problem.pretrained())
    del incomplete["proj"]
    with pytest.raises(RuntimeError, match="proj"):
        problem.logits(incomplete, "shapes", inputs)
    with pytest.raises(BenchError, match="unknown task"):
        problem.logits(problem.pretrained(), "shape", inputs)


def _rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    return bool((rows.flatten(1)[:, None] == pool.flatten(1)[None]).all(dim=-1).any(dim=1).all())


def test_unlabeled_draws_are_seeded_positions_whose_inputs_are_gathered_on_demand(
    problem: ClipClassificationProblem,
) -> None:
    first = problem.unlabeled_indices("textures", 16, seed=5)
    assert first.dtype == torch.int64 and len(set(first.tolist())) == 16  # distinct positions
    assert torch.equal(first, problem.unlabeled_indices("textures", 16, seed=5))
    assert not torch.equal(first, problem.unlabeled_indices("textures", 16, seed=6))
    assert torch.equal(problem.unlabeled_indices("textures", 8, seed=5), first[:8])  # a smaller draw is a prefix
    inputs = problem.unlabeled_inputs("textures", first)
    assert inputs.dtype == torch.float32 and inputs.shape == (16, 3, 16, 16)
    assert torch.equal(inputs, problem.inputs("textures", "test")[first])  # the test images, in draw order
    state = torch.random.get_rng_state()
    problem.unlabeled_indices("textures", 4, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never touched


def test_protocols_draw_unlabeled_from_different_splits(ci_cache: Path) -> None:
    transductive, inductive = build_ci(ci_cache), build_ci(ci_cache, protocol="inductive")
    assert (transductive.protocol, inductive.protocol) == ("transductive", "inductive")
    test_inputs = transductive.inputs("position", "test")
    unlabeled_inputs = transductive.inputs("position", "unlabeled")
    from_test = transductive.unlabeled_inputs("position", transductive.unlabeled_indices("position", 12, seed=0))
    disjoint = inductive.unlabeled_inputs("position", inductive.unlabeled_indices("position", 12, seed=0))
    assert _rows_in(from_test, test_inputs)
    assert _rows_in(disjoint, unlabeled_inputs) and not _rows_in(disjoint[:1], test_inputs)
    with pytest.raises(BenchError, match="'unlabeled' split has"):
        inductive.unlabeled_indices("position", len(inductive.split("position", "unlabeled")) + 1, seed=0)
    with pytest.raises(BenchError, match="protocol"):
        tiny8.build(tiny8.Tiny8Params(size="ci", protocol="oracle"), ci_cache, progress=False)


def test_labeled_draws_from_train(problem: ClipClassificationProblem) -> None:
    inputs, labels = problem.labeled("counting", 10, seed=3)
    train = problem.split("counting", "train")
    assert labels.dtype == torch.int64 and labels.shape == (10,)
    assert _rows_in(inputs, problem.inputs("counting", "train"))
    for row, label in zip(inputs, labels, strict=False):
        match = (problem.inputs("counting", "train").flatten(1) == row.flatten()).all(dim=1)
        assert int(label) in train.labels[match].tolist()
    again_inputs, again_labels = problem.labeled("counting", 10, seed=3)
    assert torch.equal(inputs, again_inputs) and torch.equal(labels, again_labels)


def test_splits_are_balanced_and_disjoint(problem: ClipClassificationProblem) -> None:
    sizes = problem.describe()["split_sizes"]
    preset = tiny8.PRESETS["ci"]
    assert sizes["shapes"] == preset.split_sizes()
    labels = problem.split("sizes", "test").labels
    assert torch.bincount(labels).tolist() == [len(labels) // 4] * 4
    train = problem.split("digits", "train").images.flatten(1)
    test = problem.split("digits", "test").images.flatten(1)
    assert not (train[:, None] == test[None]).all(dim=-1).any()


def test_is_a_merge_problem(problem: ClipClassificationProblem) -> None:
    assert isinstance(problem, MergeProblem)
    assert problem.name == "tiny8" and problem.tasks == list(tiny8.TASKS)
    facts = problem.describe()
    assert facts["num_classes"]["digits"] == 10 and facts["protocol"] == "transductive"
    json.dumps(facts)  # records must be able to store it


def test_one_encoder_pass_for_all_tasks_matches_per_task_logits(problem: ClipClassificationProblem) -> None:
    params = {k: v.clone().requires_grad_(True) for k, v in problem.pretrained().items()}
    batches = {task: problem.inputs(task, "test")[: 5 + i] for i, task in enumerate(problem.tasks)}
    together = problem.logits_per_task(params, batches)
    assert list(together) == problem.tasks
    for task, inputs in batches.items():
        alone = problem.logits(params, task, inputs)
        assert together[task].shape == (len(inputs), problem.heads[task].num_classes)
        torch.testing.assert_close(together[task], alone, rtol=1e-5, atol=1e-5)
    # gradients flow to the shared weights exactly as through the per-task passes
    (grad_together,) = torch.autograd.grad(sum(v.sum() for v in together.values()), params["conv1.weight"])
    alone_sum = sum(problem.logits(params, t, x).sum() for t, x in batches.items())
    (grad_alone,) = torch.autograd.grad(alone_sum, params["conv1.weight"])
    assert (grad_together - grad_alone).norm() <= 1e-4 * grad_alone.norm()  # float32 summation order only
