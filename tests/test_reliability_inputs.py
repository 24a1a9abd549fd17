"""Issue 12 (reliability): user-given names never write outside the results folder or the cache; lm-eval task YAMLs
that would import and run Python need --trust-task-code; lm-eval datasets stay under the bench cache.

Offline, on the tiny artefacts of tests/test_custom_suite.py (a GPT-2 causal LM with a word-level tokenizer and
two experts), tests/fixtures_vision.py (a tiny CLIP in the hub cache's layout) and tests/fixtures_nlp.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fixtures_nlp as fx
import fixtures_vision as fv
import pytest
from test_custom_suite import VALID, save_tiny_causal_lm

from bench.cli import build_parser, main, run_config
from bench.errors import BenchError
from bench.registry import build_params, get_suite
from bench.store import ResultsStore
from suites import _hub, _lm, llm
from suites._suite_file import read_suite_file
from suites._vit_tasks import TASK_SPECS

NAME_RULE = "use only letters, digits and _ - . (not . or ..)"
TRUST_HINT = ("it is not loaded unless you trust its source: rerun with --trust-task-code "
              "(--set suite.trust_task_code=true)")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> Path:
    """``base/``, ``experts/{sentiment,colour}/`` and ``data/{sentiment,colour}.jsonl`` (prompt, label)."""
    root = tmp_path_factory.mktemp("reliability-lm")
    save_tiny_causal_lm(root)
    return root


def mc_task(task: str, data_file: Path, extra: str = "") -> str:
    """A multiple-choice lm-eval task over a local JSONL, with no ``cache_dir`` of its own (as users write them)."""
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\n"
            "doc_to_choice: [\"positive\", \"negative\"]\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n" + extra)


def lm_suite_file(path: Path, lm: Path, tasks: Path, *, name: str = "", task: str = "sentiment") -> Path:
    """An lm-eval suite file with one task (``tiny_sentiment``, found in the folder ``tasks``)."""
    top = f"name = {json.dumps(name)}\n" if name else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'kind = "lm-eval"\n{top}base = "{lm / "base"}"\n[tasks.{json.dumps(task)}]\n'
                    f'expert = "{lm / "experts" / "sentiment"}"\nlm_eval_task = "tiny_sentiment"\n'
                    f'task_yaml = "{tasks}"\n')
    return path


def run_lm(capsys, suite: Path, root: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "run", "--suite", str(suite), "--methods", "pretrained", "--cache", str(root / "cache"),
                   "--results", str(root / "results"), "--out", str(root / "reports"), "--no-progress", *extra)


# -- 1. names that become path parts --------------------------------------------------------------------------------


BAD_NAMES = [
    ('name = "../../../x"\n' + VALID,
     f"name = '../../../x' is not allowed: it names the folder of the suite's records; {NAME_RULE}"),
    ('name = ".."\n' + VALID, f"name = '..' is not allowed: it names the folder of the suite's records; {NAME_RULE}"),
    (VALID.replace("[tasks.mnist]", '[tasks."../../../../x"]'),
     f"task name '../../../../x' (a [tasks.NAME] table) is not allowed: it names files in the bench cache; "
     f"{NAME_RULE}"),
    (VALID.replace("[tasks.mnist]", '[tasks."a/b"]'),
     f"task name 'a/b' (a [tasks.NAME] table) is not allowed: it names files in the bench cache; {NAME_RULE}"),
    (VALID + 'eval_split = ".."\n',
     f"tasks.mnist.eval_split = '..' is not allowed: it names folders in the bench cache; {NAME_RULE}"),
    (VALID + 'train_split = "../train"\n',
     f"tasks.mnist.train_split = '../train' is not allowed: it names folders in the bench cache; {NAME_RULE}"),
    (VALID + 'unlabeled_split = "."\n',
     f"tasks.mnist.unlabeled_split = '.' is not allowed: it names folders in the bench cache; {NAME_RULE}"),
    (VALID + 'dataset_config = "x/../../../../y"\n',
     f"tasks.mnist.dataset_config = 'x/../../../../y' is not allowed: it names folders in the bench cache; "
     f"{NAME_RULE}"),
]


@pytest.mark.parametrize(("text", "message"), BAD_NAMES, ids=[str(i) for i in range(len(BAD_NAMES))])
def test_suite_file_names_that_become_path_parts_are_checked(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(BenchError) as error:
        read_suite_file(path)
    assert str(error.value) == f"{path}: {message}"


def test_ordinary_names_still_pass(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('name = "my-suite_v1.2"\n' + VALID.replace("[tasks.mnist]", '[tasks."mnist-v2_x.1"]')
                    + 'eval_split = "test"\ndataset_config = "mnist.v1"\n')
    suite = read_suite_file(path)
    assert suite.name == "custom:my-suite_v1.2" and list(suite.tasks) == ["mnist-v2_x.1"]


def test_a_suite_named_outside_the_results_folder_writes_no_record(causal_lm, tmp_path, capsys):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_sentiment.yaml").write_text(mc_task("tiny_sentiment", causal_lm / "data" /
                                                                     "sentiment.jsonl"))
    suite = lm_suite_file(tmp_path / "suite.toml", causal_lm, tmp_path / "tasks", name="../../../x")
    root = tmp_path / "a" / "b" / "c"
    code, out, err = run_lm(capsys, suite, root)
    assert (code, out) == (2, "")
    assert err == (f"bench: error: {suite}: name = '../../../x' is not allowed: it names the folder of the suite's "
                   f"records; {NAME_RULE}\n")
    assert not list(tmp_path.rglob("*.json"))  # no record, in results/ or beside it


def test_a_task_named_outside_the_cache_writes_nothing_there(tmp_path, capsys):
    """An image task's preprocessed test images are cached as <cache>/custom/inputs/<task>-<split>-<digest>.npy:
    a task named ../../../../x would put them beside the cache's parent."""
    cache = tmp_path / "a" / "b" / "cache"
    pretrained = fv.save_hf_pretrained(cache)
    fv.save_hf_expert(cache, "mnist", pretrained, seed=1)
    fv.save_dataset_split(cache, "mnist", "test", 6, seed=0)
    spec = TASK_SPECS["mnist"]
    suite = tmp_path / "images.toml"
    suite.write_text(f'kind = "image-classification"\nbase = "{fv.BACKBONE.hf_model}"\n[tasks."../../../../x"]\n'
                     f'expert = "{fv.BACKBONE.hf_expert_prefix + spec.hf_expert}"\ndataset = "{spec.dataset}"\n'
                     f"class_names = {json.dumps(list(spec.class_names))}\n")
    before = files_under(tmp_path)
    code, out, err = run_cli(capsys, "run", "--suite", str(suite), "--methods", "pretrained", "--cache", str(cache),
                             "--results", str(tmp_path / "results"), "--out", str(tmp_path / "reports"),
                             "--no-progress")
    assert (code, out) == (2, "")
    assert err == (f"bench: error: {suite}: task name '../../../../x' (a [tasks.NAME] table) is not allowed: it names "
                   f"files in the bench cache; {NAME_RULE}\n")
    assert files_under(tmp_path) == before  # nothing written, inside the cache or out of it


def test_the_cache_refuses_folder_names_that_leave_it(tmp_path):
    folder = _hub.dataset_dir(tmp_path, "ylecun/mnist", "test", "x.1")
    assert folder == tmp_path / "hub" / "datasets" / "ylecun--mnist--x.1" / "test"
    assert _hub.model_dir(tmp_path, "owner/name") == tmp_path / "hub/models/owner--name"
    for call, message in [
        (lambda: _hub.dataset_dir(tmp_path, "ylecun/mnist", "../../../../x"), "dataset split '../../../../x'"),
        (lambda: _hub.dataset_dir(tmp_path, "ylecun/mnist", "test", "a/../../.."),
         "dataset configuration 'a/../../..'"),
        (lambda: _hub.dataset_dir(tmp_path, "..", "test"), "dataset hub id '..'"),
        (lambda: _hub.model_dir(tmp_path, ".."), "hub id '..'"),
    ]:
        with pytest.raises(BenchError) as error:
            call()
        assert str(error.value) == (f"{message} cannot name a folder in the bench cache (it would resolve outside "
                                    f"it); {NAME_RULE}")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_an_lm_eval_include_task_naming_a_dataset_folder_outside_the_cache_is_refused(tmp_path):
    """llm-mergebench caches a task's hub dataset as hub/datasets/<path>[--<dataset_name>]/<split>/, names read from
    the YAMLs of suite.lm_eval_include: `bench prepare` would download into ../../../../x."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fixture_mc.yaml").write_text(fx.MC_TASK.replace("test_split: test", "test_split: ../../../../x"))
    params = build_params("suite", llm.LlmParams, {"task_map": "alpha=fixture_mc", "lm_eval_include": str(tasks)})
    with pytest.raises(BenchError) as error:
        get_suite("llm-mergebench").missing(params, tmp_path / "cache")
    assert str(error.value) == (f"lm-eval task 'fixture_mc' ({tasks / 'fixture_mc.yaml'}): test_split = "
                                f"'../../../../x' is not allowed: it names a folder in the bench cache; {NAME_RULE}")


def test_the_store_refuses_a_record_that_would_land_outside_its_root(tmp_path):
    store = ResultsStore(tmp_path / "results")
    record = {"schema": 1, "suite": "custom:../../x", "method": "pretrained", "config_hash": "0123456789abcdef"}
    with pytest.raises(BenchError) as error:
        store.put(record)
    assert str(error.value) == (f"refusing to store a record of suite 'custom:../../x', method 'pretrained' under "
                                f"{tmp_path / 'results'}: 'custom:../../x' cannot be a folder or file name there "
                                f"(no '/', not '.' or '..')")
    with pytest.raises(BenchError, match=r"method '\.\.' under .*: '\.\.' cannot be a folder or file name there"):
        store.put({**record, "suite": "tiny8", "method": ".."})
    with pytest.raises(BenchError, match=r"refusing to store a record of suite 'tiny8', method '../x'"):
        store.path_for({"suite": "tiny8", "method": "../x", "seed": 0})
    assert files_under(tmp_path) == []
    written = store.put({**record, "suite": "custom:ok"})
    assert written == tmp_path / "results" / "custom:ok" / "pretrained" / "0123456789abcdef.json"


# -- 2. task YAMLs that would import and run Python --------------------------------------------------------------

MARKER_MODULE = """from pathlib import Path

Path(__file__).with_name("imported.marker").write_text("this module was imported")


def process_docs(dataset):
    return dataset
"""


def code_task_folder(folder: Path, data_file: Path) -> Path:
    """``tiny_sentiment`` whose process_docs is ``!function utils.process_docs``; importing utils.py leaves a
    marker file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(MARKER_MODULE)
    (folder / "tiny_sentiment.yaml").write_text(mc_task("tiny_sentiment", data_file,
                                                        "process_docs: !function utils.process_docs\n"))
    return folder / "tiny_sentiment.yaml"


def test_a_task_yaml_with_function_tags_needs_trust_task_code(causal_lm, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    yaml_file = code_task_folder(tasks, causal_lm / "data" / "sentiment.jsonl")
    suite = lm_suite_file(tmp_path / "code.toml", causal_lm, yaml_file)  # a file: lm-eval indexes its folder
    code, out, err = run_lm(capsys, suite, tmp_path)
    assert (code, out) == (2, "")
    assert err == (f"bench: error: {suite}: tasks.sentiment.task_yaml: lm-eval task file {yaml_file} has a !function "
                   f"tag: it would import and run Python code from {tasks}; {TRUST_HINT}\n")
    assert not (tasks / "imported.marker").exists() and not (tmp_path / "results").exists()

    code, out, err = run_lm(capsys, suite, tmp_path, "--trust-task-code")
    assert code == 0, err
    assert (tasks / "imported.marker").is_file()  # the opt-in really lets lm-eval run the task's code
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json"))}
    assert records["pretrained"]["suite_params"]["trust_task_code"] is True
    assert records["pretrained"]["tasks"]["sentiment"]["num_examples"] == 6


def test_a_function_tag_in_an_included_yaml_is_found(causal_lm, tmp_path, capsys):
    shared = tmp_path / "shared"
    included = code_task_folder(shared, causal_lm / "data" / "sentiment.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_sentiment.yaml").write_text("include: ../shared/tiny_sentiment.yaml\ntask: tiny_sentiment\n")
    suite = lm_suite_file(tmp_path / "included.toml", causal_lm, tasks)
    code, out, err = run_lm(capsys, suite, tmp_path)
    assert (code, out) == (2, "")
    assert err == (f"bench: error: {suite}: tasks.sentiment.task_yaml: lm-eval task file {included} has a !function "
                   f"tag: it would import and run Python code from {shared}; {TRUST_HINT}\n")
    assert not (shared / "imported.marker").exists()


def test_lm_eval_include_with_function_tags_needs_trust_task_code(tmp_path, capsys):
    cache, tasks = tmp_path / "cache", tmp_path / "tasks"
    fx.make_llm(cache, tasks)
    (tasks / "utils.py").write_text(MARKER_MODULE)
    with (tasks / "fixture_mc.yaml").open("a") as handle:
        handle.write("process_docs: !function utils.process_docs\n")
    settings = ["--set", f"suite.base_model={fx.LLM_BASE}", "--set", f"suite.expert_template={fx.LLM_EXPERTS}",
                "--set", "suite.task_map=alpha=fixture_mc;beta=fixture_gen", "--set", f"suite.lm_eval_include={tasks}",
                "--set", "suite.dtype=float32"]
    code, out, err = run_cli(capsys, "run", "--suite", "llm-mergebench", "--methods", "pretrained", "--cache",
                             str(cache), "--results", str(tmp_path / "results"), "--out", str(tmp_path / "reports"),
                             "--no-progress", *settings)
    assert (code, out) == (2, "")
    assert err == (f"bench: error: suite.lm_eval_include: lm-eval task file {tasks / 'fixture_mc.yaml'} has a "
                   f"!function tag: it would import and run Python code from {tasks}; {TRUST_HINT}\n")
    assert not (tasks / "imported.marker").exists() and not (tmp_path / "results").exists()


def test_trust_task_code_on_a_suite_without_task_yamls_says_so(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", "--suite", "tiny8", "--trust-task-code", "--results", str(tmp_path))
    assert (code, out) == (2, "")
    assert err == ("bench: error: --trust-task-code: suite 'tiny8' never loads lm-eval task YAMLs that could run "
                   "code; drop the flag\n")


def test_workers_get_the_flag(tmp_path):
    """Workers (a --jobs pool, Ray) rebuild the suite configuration from the driver's Setting: the trust flag is
    one of its suite parameters, so a worker loads the suite with it."""
    from bench.execution import Setting

    args = build_parser().parse_args(["run", "--suite", "llm-mergebench", "--jobs", "2", "--trust-task-code"])
    setting = Setting.of(run_config(args, ["pretrained"]))
    spec = get_suite(setting.suite)
    assert build_params("suite", spec.params, dict(setting.suite_overrides)).trust_task_code is True


def test_task_code_scan_reads_tags_not_text(tmp_path):
    """Tags are read by a loader that records them (verbatim, %TAG-declared and PyYAML python tags included);
    `!function` in a comment or a string is no tag; lm-eval's own task files are part of the installed package."""
    import lm_eval

    cases = {
        "plain.yaml": ("task: a\n# a comment about !function tags\ndoc_to_text: '!function x.y'\n", None),
        "tag.yaml": ("task: b\nprocess_docs: !function utils.f\n", "!function"),
        "verbatim.yaml": ("task: c\nprocess_docs: !<!function> utils.f\n", "!function"),
        "declared.yaml": ("%TAG !e! !func\n---\ntask: d\nprocess_docs: !e!tion utils.f\n", "!function"),
        "python.yaml": ("task: e\nprocess_docs: !!python/name:os.system\n", "tag:yaml.org,2002:python/name:os.system"),
        "broken.yaml": ("task: f\nx: [1,\nprocess_docs: !function utils.f\n", "!function"),
    }
    for name, (text, tag) in cases.items():
        (tmp_path / name).write_text(text)
        assert [(c.path, c.tag) for c in _lm.task_code([tmp_path / name])] == ([(tmp_path / name, tag)] if tag else [])
    builtin = next(Path(lm_eval.__file__).parent.glob("tasks/**/*.yaml"))
    uses_builtin = tmp_path / "sub" / "uses_builtin.yaml"
    uses_builtin.parent.mkdir()
    uses_builtin.write_text(f"include: {builtin}\ntask: g\n")
    assert _lm.task_code([uses_builtin.parent]) == []
    assert _lm.task_code([Path(lm_eval.__file__).parent / "tasks"]) == []


# -- 3. lm-eval datasets under the bench cache ----------------------------------------------------------------------


def test_lm_eval_datasets_stay_under_the_bench_cache(causal_lm, tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    home = tmp_path / "home"
    hf_home = home / ".cache" / "huggingface"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HF_XET_CACHE"):
        monkeypatch.delenv(name, raising=False)
    # what datasets and huggingface_hub derive from HF_HOME when imported (they read it once, at import)
    global_datasets = hf_home / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", global_datasets)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", global_datasets / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", global_datasets / "downloads" / "extracted")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_sentiment.yaml").write_text(mc_task("tiny_sentiment", causal_lm / "data" / "sentiment.jsonl"))
    suite = lm_suite_file(tmp_path / "data.toml", causal_lm, tasks)
    code, _, err = run_lm(capsys, suite, tmp_path)
    assert code == 0, err
    assert not home.exists() or files_under(home) == []  # nothing in the global datasets (or hub) cache
    cached = tmp_path / "cache" / "custom" / "hf_datasets"
    assert [p.name for p in cached.rglob("*.arrow")] == ["json-test.arrow"]
    # the environment and datasets' settings are as they were
    assert datasets.config.HF_DATASETS_CACHE == global_datasets
    assert huggingface_hub.constants.HF_HUB_CACHE == str(hf_home / "hub")
    assert "HF_DATASETS_CACHE" not in os.environ and "HF_HUB_CACHE" not in os.environ
