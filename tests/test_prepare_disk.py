"""`bench prepare` fetches only the splits the chosen methods read, keeps one copy, states and checks the disk space
first; `bench doctor` shows sizes; a run on a cache without train splits skips only the methods that need them.

The hub is a stand-in (:class:`StandInHub`) that replaces the two functions of ``suites._hub`` that reach it, serves
tiny repos made from the fixtures in the hub's formats (checkpoint files, one parquet file per dataset split) and
records every listing and every file asked for. Everything else (which files make a split, the download into a
staging folder, the conversion to a save_to_disk folder, the cache layout) is the real code.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections import namedtuple
from pathlib import Path

import fixtures_vision as fv
import pytest

from bench import registry
from bench.cli import main
from bench.disk import format_bytes
from bench.errors import BenchError, MethodNotApplicable
from suites import _hub
from suites._vit_tasks import TASK_SPECS
from suites.vit import VitParams, build_vit

TASKS = ["eurosat", "mnist"]
SUBSET = "suite.tasks=mnist,eurosat"
EXTRA_MODEL_FILES = ("flax_model.msgpack", "pytorch_model.bin")  # on the hub, never fetched (safetensors exist)
Usage = namedtuple("Usage", "total used free")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class StandInHub:
    """Repos as folders (``<root>/<type>/<owner>--<name>/<files>``); counts what is listed and fetched."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listed: list[tuple[str, str]] = []  # (repo type, repo id)
        self.fetched: list[tuple[str, str]] = []  # (repo id, file path)
        self.on_first_fetch = None

    def repo(self, repo_id: str, repo_type: str) -> Path:
        return self.root / repo_type / repo_id.replace("/", "--")

    def listing(self, repo_id: str, repo_type: str, revision: str | None = None) -> _hub.RepoListing:
        self.listed.append((repo_type, repo_id))
        folder = self.repo(repo_id, repo_type)
        if revision is not None or not folder.is_dir():
            raise BenchError(f"cannot list {repo_type} {repo_id} on the hub: not found")
        return _hub.RepoListing({p.relative_to(folder).as_posix(): p.stat().st_size
                                 for p in sorted(folder.rglob("*")) if p.is_file()})

    def download(self, repo_id: str, repo_type: str, patterns, folder: Path, revision: str | None = None) -> None:
        if not self.fetched and self.on_first_fetch is not None:
            self.on_first_fetch()
        source = self.repo(repo_id, repo_type)
        for path in sorted(source.rglob("*")):
            name = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                self.fetched.append((repo_id, name))
                target = Path(folder) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        (Path(folder) / _hub.CLIENT_CACHE / "huggingface").mkdir(parents=True, exist_ok=True)  # as the client does

    def served_bytes(self, fetched: list[tuple[str, str]]) -> int:
        sizes = {}
        for repo_type in ("model", "dataset"):
            for repo in (self.root / repo_type).iterdir():
                for path in repo.rglob("*"):
                    sizes[(repo.name.replace("--", "/", 1), path.relative_to(repo).as_posix())] = path.stat().st_size
        return sum(sizes[item] for item in fetched)


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    """The hub's repos for vit8 on mnist and eurosat: checkpoints as saved, each dataset split as one parquet file."""
    import datasets

    made = fv.hf_cache(tmp_path_factory.mktemp("made") / "cache", TASKS)
    root = tmp_path_factory.mktemp("hub")
    for folder in (made / "hub" / "models").iterdir():
        repo = root / "model" / folder.name
        shutil.copytree(folder, repo, ignore=shutil.ignore_patterns(_hub.MARKER))
        for name in EXTRA_MODEL_FILES:
            (repo / name).write_bytes(b"\0" * 4096)
    for task in TASKS:
        spec = TASK_SPECS[task]
        repo = root / "dataset" / spec.dataset.replace("/", "--")
        (repo / "data").mkdir(parents=True)
        (repo / "README.md").write_text("---\nlicense: mit\n---\n")
        for split in (spec.test_split, spec.train_split):
            saved = datasets.load_from_disk(str(_hub.dataset_dir(made, spec.dataset, split)))
            saved.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def hub(hub_root, monkeypatch) -> StandInHub:
    stand_in = StandInHub(hub_root)
    monkeypatch.setattr(_hub, "repo_listing", stand_in.listing)
    monkeypatch.setattr(_hub, "download_files", stand_in.download)
    return stand_in


def prepare(capsys, cache: Path, methods: str) -> tuple[int, str, str]:
    return run_cli(capsys, "prepare", "vit8", "--set", SUBSET, "--methods", methods, "--cache", str(cache),
                   "--no-progress")


def datasets_fetched(hub: StandInHub) -> list[tuple[str, str]]:
    return [item for item in hub.fetched if item[1].endswith(".parquet")]


def split_file(task: str, split: str) -> tuple[str, str]:
    return TASK_SPECS[task].dataset, f"data/{split}-00000-of-00001.parquet"


# -- which splits, once each -------------------------------------------------------------------------------------


def test_prepare_fetches_only_the_splits_the_methods_read_once_each(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = prepare(capsys, cache, "task_arithmetic")
    assert code == 0, err
    assert out == f"vit8 is ready in {cache} for --methods task_arithmetic\n"
    assert sorted(datasets_fetched(hub)) == sorted([split_file("mnist", "test"), split_file("eurosat", "test")])
    checkpoint_files = {path for repo, path in hub.fetched if repo == "openai/clip-vit-base-patch32"}
    assert "model.safetensors" in checkpoint_files and "config.json" in checkpoint_files
    assert not checkpoint_files & set(EXTRA_MODEL_FILES)
    assert len(hub.fetched) == len(set(hub.fetched))

    hub.listed.clear(), hub.fetched.clear()
    assert prepare(capsys, cache, "task_arithmetic")[0] == 0
    assert (hub.listed, hub.fetched) == ([], [])  # everything is there: the hub is not even asked

    code, out, err = prepare(capsys, cache, "fisher")
    assert code == 0, err
    assert sorted(hub.fetched) == sorted([split_file("mnist", "train"), split_file("eurosat", "train")])
    hub.listed.clear(), hub.fetched.clear()
    assert prepare(capsys, cache, "all")[0] == 0
    assert (hub.listed, hub.fetched) == ([], [])


def test_which_splits_the_methods_need(tmp_path):
    spec, cache = registry.get_suite("vit8"), tmp_path / "empty"
    transductive = registry.build_params("suite", spec.params, {"tasks": "mnist"})
    inductive = registry.build_params("suite", spec.params, {"tasks": "mnist", "protocol": "inductive"})
    needs = {name: registry.DataNeeds.of([registry.get_method(name)])
             for name in ("task_arithmetic", "adamerging_tw", "regmean")}
    train = "dataset ylecun/mnist, train split"
    assert train not in spec.missing(transductive, cache, needs["task_arithmetic"])
    assert train not in spec.missing(transductive, cache, needs["adamerging_tw"])  # adapts on the test split
    assert train in spec.missing(inductive, cache, needs["adamerging_tw"])  # the inductive pool is train
    assert train in spec.missing(transductive, cache, needs["regmean"])
    assert train in spec.missing(transductive, cache)  # by default: every method


def test_a_suite_lacking_only_training_data_is_partly_ready(tmp_path, capsys, monkeypatch):
    def readiness(params, cache_dir, needs=registry.ALL_DATA):
        return ["dataset owner/data, train split"] if needs.labeled else []

    spec = registry.SuiteSpec("halfway", registry.NoParams, "test-only", fn=lambda *args: None, readiness=readiness,
                              prepare=lambda *args: None)
    monkeypatch.setitem(registry._SUITES, "halfway", spec)
    label = ("partly ready: 1 artefact(s) missing, needed only by methods that read training data "
             "(`bench prepare halfway`)")
    _, listing, _ = run_cli(capsys, "list", "suites", "--cache", str(tmp_path))
    assert f"halfway  [{label}]  test-only" in listing
    _, out, _ = run_cli(capsys, "doctor", "--cache", str(tmp_path))
    assert f"halfway: {label}\n    missing: dataset owner/data, train split (size unknown until prepare)\n" in out


# -- one copy, nothing outside the cache -------------------------------------------------------------------------


def test_only_one_copy_remains_and_nothing_goes_to_the_global_caches(hub, tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    elsewhere = tmp_path / "global"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", elsewhere / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(elsewhere / "hub"))
    monkeypatch.setenv("HF_HOME", str(elsewhere))
    cache = tmp_path / "cache"
    code, _, err = prepare(capsys, cache, "all")
    assert code == 0, err

    folders = {p.parent for p in cache.rglob(_hub.MARKER)}
    assert len(folders) == 3 + 4  # pretrained, 2 experts; test and train split of 2 datasets
    strays = [p for p in cache.rglob("*") if p.is_file() and not any(f in p.parents for f in folders)]
    assert [p.relative_to(cache).as_posix() for p in strays] == ["hub/expected-sizes.json"]
    assert not [p for p in cache.rglob("*") if p.name.startswith(".") or p.name in ("downloads", "hub-cache")]
    for task in TASKS:  # a save_to_disk folder of Arrow files: no parquet copy, no Arrow cache beside it
        names = sorted(p.name for p in _hub.dataset_dir(cache, TASK_SPECS[task].dataset, "test").iterdir())
        assert names == ["COMPLETE", "data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    checkpoints = [p for p in (cache / "hub" / "models").rglob("*") if p.is_file() and p.name != _hub.MARKER]
    assert sum(p.stat().st_size for p in checkpoints) == hub.served_bytes(
        [item for item in hub.fetched if not item[1].endswith(".parquet")])  # exactly the files fetched, once
    splits = sum(p.stat().st_size for p in (cache / "hub" / "datasets").rglob("*") if p.is_file())
    assert splits < 1.3 * hub.served_bytes(datasets_fetched(hub))  # a second copy (parquet, Arrow cache) doubles it
    assert not elsewhere.exists()

    problem = build_vit("vit8", VitParams(tasks="mnist,eurosat"), cache, progress=False)  # what prepare left loads
    assert len(problem.split("mnist", "test")) == 12 and len(problem.split("eurosat", "train")) == 16


# -- sizes: printed first, checked against free space, shown by doctor ---------------------------------------------


def test_expected_size_is_printed_before_anything_is_fetched(hub, tmp_path, capsys):
    printed = []
    hub.on_first_fetch = lambda: printed.append(capsys.readouterr().err)
    cache = tmp_path / "cache"
    assert prepare(capsys, cache, "task_arithmetic")[0] == 0
    expected = hub.served_bytes(hub.fetched)
    lines = printed[0].splitlines()
    assert lines[0] == (f"vit8: 5 artefact(s), {format_bytes(expected)} expected; 0 B already present, "
                        f"{format_bytes(expected)} to fetch")
    mnist_test = hub.served_bytes([split_file("mnist", "test")])
    assert f"    fetch    {format_bytes(mnist_test):>9}  dataset ylecun/mnist, test split" in lines
    assert len(lines) == 1 + 5

    hub.fetched.clear()
    hub.on_first_fetch = None
    present = sum(p.stat().st_size for p in (cache / "hub").rglob("*")
                  if p.is_file() and p.name != _hub.EXPECTED_SIZES)
    code, _, err = prepare(capsys, cache, "fisher")
    assert code == 0
    train = hub.served_bytes(hub.fetched)
    assert err.splitlines()[0] == (f"vit8: 7 artefact(s), {format_bytes(present + train)} expected; "
                                   f"{format_bytes(present)} already present, {format_bytes(train)} to fetch")
    assert sum(line.startswith("    present ") for line in err.splitlines()) == 5


def test_not_enough_space_stops_before_any_download_and_doctor_knows_the_sizes(hub, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module

    cache = tmp_path / "cache"
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: Usage(10**12, 10**12 - 2000, 2000))
    code, out, err = prepare(capsys, cache, "fisher")
    assert code == 2 and out == "" and hub.fetched == []
    error = err.splitlines()[-1]
    assert error.startswith(f"bench: error: not enough disk space for `bench prepare vit8 --set {SUBSET} --methods "
                            f"fisher`: it needs ")
    assert error.endswith(f" in {cache}, but only 2.0 kB is free there; free some space or pass --cache DIR on a "
                          f"larger disk")
    assert "Traceback" not in err

    code, out, _ = run_cli(capsys, "doctor", "--cache", str(cache))
    assert code == 0
    mnist_train = hub.served_bytes([split_file("mnist", "train")])
    assert f"    missing: dataset ylecun/mnist, train split (expected {format_bytes(mnist_train)})" in out
    assert "    missing: dataset tanganke/sun397, test split (size unknown until prepare)" in out


def test_doctor_shows_what_each_prepared_artefact_takes(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert prepare(capsys, cache, "task_arithmetic")[0] == 0
    code, out, _ = run_cli(capsys, "doctor", "--cache", str(cache))
    assert code == 0
    base = _hub.folder_bytes(_hub.model_dir(cache, "openai/clip-vit-base-patch32"))
    assert f"    {format_bytes(base):>9}  checkpoint openai/clip-vit-base-patch32" in out
    assert "    missing: dataset ylecun/mnist, train split (size unknown until prepare)" in out
    vit8 = out[out.index("\nvit8: "):]  # vit14 and vit20 share these artefacts
    on_disk = sum(p.stat().st_size for p in (cache / "hub").rglob("*")
                  if p.is_file() and p.name != _hub.EXPECTED_SIZES)
    assert f"    total: {format_bytes(on_disk)} on disk; 20 missing, 0 B expected (20 of unknown size)" in vit8


# -- runs on a cache prepared without train splits ----------------------------------------------------------------


def test_run_without_train_splits_runs_data_free_methods_and_skips_fisher_with_the_command(hub, tmp_path, capsys):
    cache, results = tmp_path / "cache", tmp_path / "results"
    assert prepare(capsys, cache, "task_arithmetic")[0] == 0
    argv = ["run", "--suite", "vit8", "--methods", "task_arithmetic,fisher", "--set", SUBSET,
            "--set", "fisher.num_samples=4", "--cache", str(cache), "--results", str(results),
            "--out", str(tmp_path / "reports"), "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    recorded = sorted(json.loads(p.read_text())["method"] for p in results.rglob("*.json"))
    assert recorded == ["individual", "task_arithmetic"]
    labeled = ",".join(registry.methods_reading("labeled"))  # fisher, regmean and the other labeled-data methods
    assert {"fisher", "regmean"} <= set(labeled.split(","))
    reason = (f"not applicable: fisher: the train split of dataset tanganke/eurosat (task 'eurosat') (labeled "
              f"examples) was not prepared; run `bench prepare vit8 --set {SUBSET} --methods {labeled}` (same "
              f"--cache/BENCH_CACHE), then rerun")
    assert reason in err.splitlines()

    assert prepare(capsys, cache, "fisher,regmean")[0] == 0
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert "1 run(s) computed, 1 already recorded" in err  # task_arithmetic kept, fisher now runs
    recorded = sorted(json.loads(p.read_text())["method"] for p in results.rglob("*.json"))
    assert recorded == ["fisher", "individual", "task_arithmetic"]


def test_inductive_pool_without_the_train_split_names_the_test_time_methods(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert prepare(capsys, cache, "task_arithmetic")[0] == 0
    problem = build_vit("vit8", VitParams(tasks="mnist", protocol="inductive"), cache, progress=False)
    assert len(problem.split("mnist", "test")) == 12  # scoring works
    with pytest.raises(MethodNotApplicable) as error:
        problem.unlabeled_size("mnist")
    unlabeled = ",".join(registry.methods_reading("unlabeled"))  # the test-time methods
    assert {"adamerging_lw", "adamerging_tw", "samerging", "samerging_tw"} <= set(unlabeled.split(","))
    assert str(error.value).endswith(
        "(the inductive protocol's unlabeled pool) was not prepared; run `bench prepare vit8 --set "
        f"suite.protocol=inductive --set suite.tasks=mnist --methods {unlabeled}` (same --cache/BENCH_CACHE), "
        "then rerun")


# -- which hub files are one split --------------------------------------------------------------------------------


def test_split_files_follow_the_card_the_file_names_or_the_parquet_conversion(monkeypatch):
    card = {"configs": [{"config_name": "cola", "data_files": [{"split": "train", "path": "cola/train-*"},
                                                               {"split": "validation", "path": "cola/validation-*"}]},
                        {"config_name": "sst2", "data_files": [{"split": "train", "path": "sst2/train-*"}]}]}
    listings = {
        ("nyu-mll/glue", None): _hub.RepoListing({"cola/train-00000-of-00001.parquet": 10,
                                                  "cola/validation-00000-of-00001.parquet": 3,
                                                  "sst2/train-00000-of-00001.parquet": 50, "README.md": 1}, card),
        ("plain/data", None): _hub.RepoListing({"data/test-00000-of-00002.parquet": 5,
                                                "data/test-00001-of-00002.parquet": 6,
                                                "data/train-00000-of-00001.parquet": 9, "README.md": 1}),
        ("old/script", None): _hub.RepoListing({"script.py": 4, "README.md": 1}),
        ("old/script", _hub.PARQUET_REVISION): _hub.RepoListing({"default/test/0000.parquet": 7,
                                                                 "default/train/0000.parquet": 8}),
    }
    def listing(repo: str, kind: str, revision: str | None = None) -> _hub.RepoListing:
        if (repo, revision) not in listings:
            raise BenchError(f"cannot list {kind} {repo} on the hub: not found")
        return listings[(repo, revision)]

    monkeypatch.setattr(_hub, "repo_listing", listing)
    assert _hub.dataset_split_files("nyu-mll/glue", "validation", "cola") == [
        _hub.RemoteFile("cola/validation-00000-of-00001.parquet", 3)]
    assert [f.path for f in _hub.dataset_split_files("plain/data", "test")] == [
        "data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet"]
    assert _hub.dataset_split_files("old/script", "test") == [
        _hub.RemoteFile("default/test/0000.parquet", 7, _hub.PARQUET_REVISION)]
    with pytest.raises(BenchError, match=r"dataset nyu-mll/glue has no config 'mnli' on the hub \(it has cola, sst2\)"):
        _hub.dataset_split_files("nyu-mll/glue", "train", "mnli")
    with pytest.raises(BenchError, match="dataset plain/data has no files for split 'validation' on the hub"):
        _hub.dataset_split_files("plain/data", "validation")


def test_glue_without_train_splits_scores_and_skips_what_reads_them(tmp_path):
    import fixtures_nlp as fx
    import torch

    cache = tmp_path / "cache"
    fx.make_glue_gpt2(cache)
    for task in ("sst2", "rte"):
        (_hub.dataset_dir(cache, fx.GLUE, "train", config=task) / _hub.MARKER).unlink()
    spec = registry.get_suite("glue-gpt2")
    params = registry.build_params("suite", spec.params, {"base_model": fx.GPT2_BASE, "dataset": fx.GLUE,
                                                          "expert_template": fx.GPT2_EXPERTS, "tasks": "sst2,rte"})
    assert spec.missing(params, cache, registry.SCORED_SPLITS_ONLY) == []
    assert len(spec.missing(params, cache, registry.DataNeeds.of([registry.get_method("regmean")]))) == 2
    problem = spec.fn(params, cache, False)
    assert problem.evaluate(problem.pretrained(), "rte", torch.device("cpu")).num_examples == 12
    with pytest.raises(MethodNotApplicable, match=r"the train split of dataset fixture/glue \(rte\) \(labeled "
                                                  r"examples\) was not prepared; run `bench prepare glue-gpt2 --set "
                                                  r"suite\.tasks=sst2,rte .*--methods "
                                                  + ",".join(registry.methods_reading("labeled")) + "`"):
        problem.labeled("rte", 4, seed=0)
