"""The real vision suites (vit8 / vit14 / vit20), offline, on tiny artefacts in the real on-disk formats.

Each source's whole code path runs end to end through ``bench run``: cached checkpoints (transformers
``save_pretrained`` / open_clip safetensors / task_vectors pickles), ``save_to_disk`` datasets, zero-shot heads from
the text tower, CLIP preprocessing, functional forward with merged weights and gradient-based adaptation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fixtures_vision as fv
import numpy as np
import pytest
import torch

from bench.cli import main
from bench.errors import BenchError, MissingArtifact
from suites import _clip_images as clip_images
from suites import _hub
from suites import vit as vit_suite
from suites._vit_tasks import SUITE_TASKS, TASK_SPECS
from suites.vit import VitParams, build_vit, missing_artefacts, prepare_suite

TASKS = ["eurosat", "mnist"]  # suite order of vit8
SUBSET = "suite.tasks=mnist,eurosat"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records_by_method(results: Path) -> dict[str, dict]:
    return {record["method"]: record for record in
            (json.loads(path.read_text()) for path in results.rglob("*.json"))}


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    return fv.hf_cache(tmp_path_factory.mktemp("hf") / "cache", TASKS)


@pytest.fixture(scope="module")
def openclip_cache(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("openclip")
    fv.register_tiny_openclip(root / "configs")
    model = fv.tiny_openclip_model()
    cache = root / "cache"
    fv.save_openclip_pretrained(cache, model)
    for index, task in enumerate(TASKS):
        fv.save_openclip_expert_safetensors(cache, task, model, seed=index + 1)
    fv.save_datasets(cache, TASKS)
    return cache, model


# -- task specs ---------------------------------------------------------------------------------------------------


def test_suites_have_the_published_task_lists_with_complete_specs():
    assert [len(SUITE_TASKS[s]) for s in ("vit8", "vit14", "vit20")] == [8, 14, 20]
    assert SUITE_TASKS["vit20"][:14] == SUITE_TASKS["vit14"] and SUITE_TASKS["vit14"][:8] == SUITE_TASKS["vit8"]
    sizes = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
             "mnist": 10, "dtd": 47, "oxford_flowers102": 102, "pcam": 2, "fer2013": 7, "oxford_iiit_pet": 37,
             "stl10": 10, "cifar100": 100, "cifar10": 10, "food101": 101, "fashion_mnist": 10, "emnist_letters": 26,
             "kmnist": 10, "rendered_sst2": 2}
    assert {name: len(spec.class_names) for name, spec in TASK_SPECS.items()} == sizes
    for spec in TASK_SPECS.values():
        assert len(set(spec.class_names)) == len(spec.class_names), spec.name
        assert spec.templates and all(t.count("{}") == 1 for t in spec.templates), spec.name
    assert TASK_SPECS["mnist"].prompts("7") == ['a photo of the number: "7".']
    assert TASK_SPECS["food101"].test_split == "validation"
    assert TASK_SPECS["svhn"].config == "cropped_digits"


# -- readiness, prepare, the missing-cache error ---------------------------------------------------------------------


def test_readiness_names_every_artefact_of_the_configuration(tmp_path):
    missing = missing_artefacts("vit8", VitParams(), tmp_path)
    assert len(missing) == 1 + 8 + 16  # pretrained, one expert per task, test and train split per task
    assert missing[:2] == ["checkpoint openai/clip-vit-base-patch32",
                           "expert checkpoint tanganke/clip-vit-base-patch32_sun397"]
    assert "dataset ufldl-stanford/svhn (cropped_digits), test split" in missing
    openclip = missing_artefacts("vit20", VitParams(source="openclip", backbone="vit-l-14"), tmp_path)
    assert openclip[:2] == ["open_clip weights timm/vit_large_patch14_clip_224.openai",
                            "task_vectors expert ViT-L-14/SUN397/finetuned.pt"]
    assert "dataset ethz/food101, validation split" in openclip
    with pytest.raises(BenchError, match="unknown task of suite vit8 'mnst'; did you mean: mnist"):
        missing_artefacts("vit8", VitParams(tasks="mnst"), tmp_path)


def test_prepare_downloads_verifies_and_resumes(tmp_path, monkeypatch):
    """prepare with the hub clients replaced by writers of fixture files in the hub's formats."""
    source = fv.hf_cache(tmp_path / "hub", TASKS)  # what "the hub" serves
    calls: list[str] = []

    def fake_model(repo_id, folder, allow_patterns=None):
        calls.append(repo_id)
        served = _hub.model_dir(source, repo_id)
        for path in served.iterdir():
            if path.name != _hub.MARKER and any(Path(path.name).match(p) for p in allow_patterns or ["*"]):
                (Path(folder) / path.name).write_bytes(path.read_bytes())

    def fake_dataset(repo_id, split, folder, config=None):
        calls.append(f"{repo_id}:{split}")
        served = _hub.dataset_dir(source, repo_id, split, config)
        for path in served.iterdir():
            if path.name != _hub.MARKER:
                (Path(folder) / path.name).write_bytes(path.read_bytes())

    monkeypatch.setattr(_hub, "download_model", fake_model)
    monkeypatch.setattr(_hub, "download_dataset", fake_dataset)
    cache, params = tmp_path / "cache", VitParams(tasks="mnist,eurosat")
    assert len(missing_artefacts("vit8", params, cache)) == 7
    prepare_suite("vit8", params, cache, progress=False)
    assert missing_artefacts("vit8", params, cache) == []
    assert sorted(p.name for p in _hub.model_dir(cache, "openai/clip-vit-base-patch32").iterdir()) == [
        "COMPLETE", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert "ylecun/mnist:test" in calls and "tanganke/eurosat:train" in calls

    calls.clear()
    prepare_suite("vit8", params, cache, progress=False)  # everything verified: nothing fetched again
    assert calls == []
    weights = _hub.model_dir(cache, "tanganke/clip-vit-base-patch32_mnist") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")  # same size, wrong content
    prepare_suite("vit8", params, cache, progress=False)
    assert calls == ["tanganke/clip-vit-base-patch32_mnist"]
    build_vit("vit8", params, cache, progress=False)  # what prepare left is loadable


def test_prepare_rejects_a_dataset_without_the_task_columns(tmp_path, monkeypatch):
    def wrong_columns(repo_id, split, folder, config=None):
        import datasets

        datasets.Dataset.from_dict({"img": [0], "label": [0]}).save_to_disk(str(folder))

    monkeypatch.setattr(_hub, "download_dataset", wrong_columns)
    monkeypatch.setattr(vit_suite, "model_artefacts", lambda *args: [])
    with pytest.raises(BenchError, match=r"dataset ylecun/mnist in .* has no column 'image' \(it has img, label\)"):
        prepare_suite("vit8", VitParams(tasks="mnist"), tmp_path, progress=False)


def test_openclip_experts_without_a_hub_mirror_are_placed_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(_hub, "download_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(vit_suite, "dataset_artefacts", lambda *args: [])
    params = VitParams(source="openclip", tasks="mnist")
    with pytest.raises(BenchError) as error:
        prepare_suite("vit8", params, tmp_path, progress=False)
    assert str(error.value).startswith("1 artefact(s) cannot be downloaded from the hub, first: task_vectors expert "
                                       "ViT-B-32/MNIST/finetuned.pt; copy task_vectors' checkpoints (https://drive")
    folder = fv.task_vectors_folder(tmp_path, "mnist")
    folder.mkdir(parents=True)
    (folder / "finetuned.pt").write_bytes(b"placed by hand")
    prepare_suite("vit8", params, tmp_path, progress=False)  # adopted: its manifest is written
    assert _hub.is_complete(folder, verify=True)


def test_missing_cache_fails_fast_with_one_line(tmp_path, capsys):
    """What every method needs is checked up front: checkpoints and the 8 test splits (train splits are checked when
    a method reads one)."""
    with pytest.raises(MissingArtifact) as error:
        build_vit("vit8", VitParams(backbone="vit-b-16"), tmp_path, progress=False)
    assert str(error.value) == (
        f"suite 'vit8' needs checkpoint openai/clip-vit-base-patch16 (and 16 more), which is not in the cache "
        f"{tmp_path}; run `bench prepare vit8 --set suite.backbone=vit-b-16` on a machine with hub access "
        f"(same --cache/BENCH_CACHE), then rerun")

    results = tmp_path / "results"
    code, out, err = run_cli(capsys, "run", "--suite", "vit8", "--methods", "all", "--cache", str(tmp_path / "c"),
                             "--results", str(results), "--no-progress")
    assert code == 2 and out == ""
    assert err == (
        f"bench: error: suite 'vit8' needs checkpoint openai/clip-vit-base-patch32 (and 16 more), which is not in "
        f"the cache {tmp_path / 'c'}; run `bench prepare vit8` on a machine with hub access (same --cache/BENCH_CACHE),"
        f" then rerun\n")
    assert not any(results.rglob("*.json"))


def test_list_and_doctor_show_readiness(hf_cache, tmp_path, capsys):
    code, listing, _ = run_cli(capsys, "list", "suites", "--cache", str(tmp_path))
    assert code == 0
    for suite, count in (("vit8", 25), ("vit14", 43), ("vit20", 61)):
        assert f"{suite}  [not ready: {count} artefact(s) missing (`bench prepare {suite}`)]" in listing
    code, out, _ = run_cli(capsys, "doctor", "--cache", str(tmp_path))
    assert "vit8: not ready: 25 artefact(s) missing" in out
    assert "    missing: checkpoint openai/clip-vit-base-patch32" in out
    assert missing_artefacts("vit8", VitParams(tasks="eurosat,mnist"), hf_cache) == []


# -- the hf source ------------------------------------------------------------------------------------------------


def test_hf_source_end_to_end_through_bench_run(hf_cache, tmp_path, capsys):
    results = tmp_path / "results"
    methods = "pretrained,individual,task_arithmetic,adamerging_tw,regmean,fisher"
    code, out, err = run_cli(
        capsys, "run", "--suite", "vit8", "--methods", methods, "--set", SUBSET, "--set", "adamerging_tw.steps=2",
        "--set", "regmean.num_samples=8", "--set", "fisher.num_samples=8", "--set", "suite.eval_batch_size=5",
        "--cache", str(hf_cache), "--results", str(results), "--out", str(tmp_path / "reports"), "--no-progress")
    assert code == 0, err
    records = records_by_method(results)
    assert set(records) == set(methods.split(","))
    for name, record in records.items():
        assert set(record["tasks"]) == set(TASKS), name
        assert all(len(entry["correct"]) > 0 for entry in record["tasks"].values()), name
        assert record["suite_params"]["tasks"] == "mnist,eurosat"
    assert len(list((hf_cache / "vit" / "heads").glob("*.safetensors"))) == 2
    assert len(list((hf_cache / "vit" / "inputs").glob("*.npy"))) == 2


def test_hf_forward_matches_transformers(hf_cache):
    """The functional path with merged-weight dicts computes what transformers' own CLIP computes."""
    from transformers import CLIPModel, CLIPVisionModel

    problem = build_vit("vit8", VitParams(tasks="mnist,eurosat"), hf_cache, progress=False)
    clip = CLIPModel.from_pretrained(_hub.model_dir(hf_cache, "openai/clip-vit-base-patch32")).eval()
    inputs = problem.inputs("mnist", "test")[:4]
    with torch.no_grad():
        reference = clip.visual_projection(clip.vision_model(pixel_values=inputs).pooler_output)
        torch.testing.assert_close(problem.embed(problem.pretrained(), inputs), reference, rtol=1e-4, atol=1e-5)
        expert = CLIPVisionModel.from_pretrained(
            _hub.model_dir(hf_cache, "tanganke/clip-vit-base-patch32_eurosat")).eval()
        reference = clip.visual_projection(expert(pixel_values=inputs).pooler_output)
        torch.testing.assert_close(problem.embed(problem.expert("eurosat"), inputs), reference, rtol=1e-4, atol=1e-5)
    # the head: CLIP's template-averaged text embeddings of the class names
    spec = TASK_SPECS["mnist"]
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(
        _hub.model_dir(hf_cache, "openai/clip-vit-base-patch32"))
    with torch.no_grad():
        tokens = tokenizer([spec.prompts(c)[0] for c in spec.class_names], padding=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(**tokens).pooler_output)
    expected = torch.nn.functional.normalize(text, dim=-1)
    torch.testing.assert_close(problem.heads["mnist"].class_embeddings, expected, rtol=1e-4, atol=1e-5)
    assert problem.heads["mnist"].logit_scale == pytest.approx(float(clip.logit_scale.detach()))


def test_gradients_reach_merging_coefficients(hf_cache):
    problem = build_vit("vit8", VitParams(tasks="mnist,eurosat"), hf_cache, progress=False)
    lam = torch.tensor(0.3, requires_grad=True)
    base, expert = problem.pretrained(), problem.expert("mnist")
    merged = {k: v + lam * (expert[k] - v) for k, v in base.items()}
    logits = problem.logits(merged, "mnist", problem.inputs("mnist", "test")[:4])
    logits.logsumexp(dim=-1).sum().backward()
    assert lam.grad is not None and torch.isfinite(lam.grad) and lam.grad != 0


def test_cached_heads_and_inputs_are_reused(hf_cache, monkeypatch):
    build_vit("vit8", VitParams(tasks="mnist"), hf_cache, progress=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(vit_suite, "build_head", must_not_run)
    monkeypatch.setattr(clip_images, "clip_resize_crop", must_not_run)
    problem = build_vit("vit8", VitParams(tasks="mnist"), hf_cache, progress=False)
    assert problem.split("mnist", "test").images[0:3].shape == (3, 3, 32, 32)


def test_inductive_protocol_adapts_on_the_train_split(hf_cache):
    problem = build_vit("vit8", VitParams(tasks="mnist", protocol="inductive", cache_inputs=False), hf_cache,
                        progress=False)
    assert problem.unlabeled_size("mnist") == 16 and len(problem.split("mnist", "test")) == 12
    drawn = problem.unlabeled_indices("mnist", 16, seed=1)
    inputs = problem.unlabeled_inputs("mnist", drawn[3:7])  # one batch, decoded from the dataset on demand
    assert inputs.dtype == torch.float32 and inputs.shape == (4, 3, 32, 32)
    assert torch.equal(inputs, problem.inputs("mnist", "unlabeled")[drawn[3:7]])


def test_expert_with_other_shapes_fails_before_any_work_naming_the_tensor(hf_cache, tmp_path, capsys):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(hf_cache, cache)
    pretrained = fv.save_hf_pretrained(tmp_path / "scratch")
    fv.save_hf_expert(cache, "mnist", pretrained, seed=5, image_size=48)  # 9 patches + class token, not 4 + 1
    capsys.readouterr()
    code, out, err = run_cli(capsys, "run", "--suite", "vit8", "--methods", "task_arithmetic", "--set", SUBSET,
                             "--cache", str(cache), "--results", str(tmp_path / "r"), "--no-progress")
    assert code == 2
    assert not any((tmp_path / "r").rglob("*.json"))
    assert err == ("bench: error: expert 'mnist' tensor 'vision_model.embeddings.position_embedding.weight' has shape "
                   "(10, 32), base has (5, 32); experts must be fine-tuned from the same base\n")


# -- the openclip source ----------------------------------------------------------------------------------------


def test_openclip_source_end_to_end_through_bench_run(openclip_cache, tmp_path, capsys):
    cache, _ = openclip_cache
    results = tmp_path / "results"
    code, _, err = run_cli(
        capsys, "run", "--suite", "vit8", "--methods", "pretrained,individual,task_arithmetic,adamerging_tw,regmean",
        "--set", "suite.source=openclip", "--set", f"suite.openclip_model={fv.TINY_OPENCLIP}", "--set", SUBSET,
        "--set", "adamerging_tw.steps=2", "--set", "regmean.num_samples=8", "--cache", str(cache),
        "--results", str(results),
        "--out", str(tmp_path / "reports"), "--no-progress")
    assert code == 0, err
    records = records_by_method(results)
    assert set(records) == {"pretrained", "individual", "task_arithmetic", "adamerging_tw", "regmean"}
    assert all(set(record["tasks"]) == set(TASKS) for record in records.values())


def test_openclip_forward_matches_open_clip(openclip_cache):
    cache, model = openclip_cache
    params = VitParams(source="openclip", openclip_model=fv.TINY_OPENCLIP, tasks="mnist,eurosat")
    problem = build_vit("vit8", params, cache, progress=False)
    assert all(key.startswith("visual.") for key in problem.pretrained())
    inputs = problem.inputs("eurosat", "test")[:3]
    with torch.no_grad():
        torch.testing.assert_close(problem.embed(problem.pretrained(), inputs), model.encode_image(inputs),
                                   rtol=1e-4, atol=1e-5)
    expected = fv.perturbed_visual(model, seed=2)
    torch.testing.assert_close(problem.expert("mnist"), expected)
    captured = problem.linear_inputs(problem.pretrained(), "eurosat", inputs)  # RegMean's statistics
    assert captured["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 5, 32)
    assert captured["visual.transformer.resblocks.1.mlp.c_fc.weight"].shape == (3 * 5, 32)


def test_pickled_experts_need_trust_pickles(openclip_cache, tmp_path, capsys):
    import shutil

    source, model = openclip_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    for index, task in enumerate(TASKS):
        (fv.task_vectors_folder(cache, task) / "finetuned.safetensors").unlink()
        fv.save_openclip_expert_pickle(cache, task, model, seed=index + 1)
    capsys.readouterr()
    params = VitParams(source="openclip", openclip_model=fv.TINY_OPENCLIP, tasks="mnist,eurosat")
    argv = ["run", "--suite", "vit8", "--methods", "task_arithmetic", "--set", "suite.source=openclip",
            "--set", f"suite.openclip_model={fv.TINY_OPENCLIP}", "--set", SUBSET, "--cache", str(cache),
            "--results", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    path = fv.task_vectors_folder(cache, "eurosat") / "finetuned.pt"
    assert code == 2
    assert err == (f"bench: error: expert 'eurosat' is a pickled module ({path}); unpickling can execute arbitrary "
                   f"code, so it is not loaded unless you trust its source: rerun with --trust-pickles "
                   f"(--set suite.trust_pickles=true), or convert it to finetuned.safetensors\n")

    code, _, err = run_cli(capsys, *argv, "--trust-pickles")
    assert code == 0, err
    trusted = build_vit("vit8", dataclasses.replace(params, trust_pickles=True), cache, progress=False)
    torch.testing.assert_close(trusted.expert("eurosat"), fv.perturbed_visual(model, seed=1))


# -- preprocessing ------------------------------------------------------------------------------------------------


def test_clip_preprocessing_matches_the_torchvision_pipeline():
    from PIL import Image
    from torchvision import transforms

    generator = np.random.default_rng(0)
    pipeline = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(32), transforms.PILToTensor()])
    for size in ((45, 37), (37, 45), (32, 32), (20, 50)):
        image = Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ours = torch.from_numpy(clip_images.clip_resize_crop(image, 32))
        assert torch.equal(ours, pipeline(image)), size
    grey = Image.fromarray(generator.integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    assert clip_images.clip_resize_crop(grey, 32).shape == (3, 32, 32)
