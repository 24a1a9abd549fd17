"""Bring-your-own suites (`bench run --suite path/to/suite.toml`), offline, on tiny artefacts in the real formats.

Image classification: the tiny transformers CLIP of ``fixtures_vision`` (a local base folder, experts as a hub id
in the cache and as a folder holding a safetensors state dict; datasets as a cached hub id and as parquet files).
lm-eval: a tiny GPT-2 causal LM with a word-level tokenizer, experts saved with ``save_pretrained`` and
multiple-choice task YAMLs over local JSONL files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fixtures_vision as fv
import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.registry import build_params, get_suite
from suites import _hub
from suites._suite_file import read_suite_file
from suites._vit_tasks import TASK_SPECS
from suites.vit import VitParams, build_vit

TASKS = ["eurosat", "mnist"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "suites"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records(results: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(results.rglob("*.json"))]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def image_task(name: str, expert: str, dataset: str, extra: str = "") -> str:
    spec = TASK_SPECS[name]
    return (f"[tasks.{name}]\nexpert = \"{expert}\"\ndataset = \"{dataset}\"\ntrain_split = \"train\"\n"
            f"class_names = {toml_list(spec.class_names)}\ntemplates = {toml_list(spec.templates)}\n{extra}")


BASE_FOLDER = "./cache/hub/models/openai--clip-vit-base-patch32"
MIXED = ('kind = "image-classification"\n'
         f'base = "{BASE_FOLDER}"\n'
         + image_task("mnist", "./local/mnist_expert", "ylecun/mnist")
         + image_task("eurosat", "tanganke/clip-vit-base-patch32_eurosat", "./local/eurosat/{split}.parquet"))


@pytest.fixture(scope="module")
def vision(tmp_path_factory) -> Path:
    """``root/cache``: a hub cache (CLIP base, experts, datasets); ``root/local``: the mnist expert as a bare
    safetensors state dict and the eurosat splits as parquet files; ``root/bad``: an expert of another shape."""
    root = tmp_path_factory.mktemp("custom-vision")
    cache = root / "cache"
    pretrained = fv.save_hf_pretrained(cache)
    for index, task in enumerate(TASKS):
        fv.save_hf_expert(cache, task, pretrained, seed=index + 1)
    fv.save_datasets(cache, TASKS)
    expert = _hub.model_dir(cache, fv.BACKBONE.hf_expert_prefix + "mnist") / "model.safetensors"
    (root / "local" / "mnist_expert").mkdir(parents=True)
    shutil.copy(expert, root / "local" / "mnist_expert" / "finetuned.safetensors")
    import datasets

    for split in ("test", "train"):
        data = datasets.load_from_disk(str(_hub.dataset_dir(cache, "tanganke/eurosat", split)))
        data.to_parquet(str(root / "local" / "eurosat" / f"{split}.parquet"))
    fv.save_hf_expert(root / "bad", "mnist", pretrained, seed=9, image_size=48)
    return root


# -- the file: schema, validation, examples --------------------------------------------------------------------------

VALID = """kind = "image-classification"
base = "openai/clip-vit-base-patch32"
[tasks.mnist]
expert = "tanganke/clip-vit-base-patch32_mnist"
dataset = "ylecun/mnist"
class_names = ["0", "1"]
"""


def test_examples_parse_one_per_kind():
    kinds = {read_suite_file(path).kind for path in sorted(EXAMPLES.glob("*.toml"))}
    assert kinds == {"image-classification", "sequence-classification", "lm-eval"}


def test_a_valid_file_is_typed_with_references_resolved(tmp_path):
    path = write(tmp_path / "ok.toml", VALID.replace('expert = "tanganke/clip-vit-base-patch32_mnist"',
                                                     'expert = "./experts/mnist"'))
    suite = read_suite_file(path)
    assert suite.name == "custom:ok" and suite.kind == "image-classification"
    task = suite.tasks["mnist"]
    assert task.class_names == ("0", "1") and task.templates == ("a photo of a {}.",) and task.eval_split == "test"
    assert suite.references() == {"base": "hub:openai/clip-vit-base-patch32",
                                  "tasks.mnist.expert": str(tmp_path / "experts" / "mnist"),
                                  "tasks.mnist.dataset": "hub:ylecun/mnist"}


ERRORS = [
    (VALID.replace("base =", "bse ="), "unknown key 'bse'; did you mean: base?"),
    (VALID.replace("class_names", "clas_names"), "unknown key 'tasks.mnist.clas_names'; did you mean: class_names?"),
    (VALID + 'text_column = "text"\n',
     'tasks.mnist.text_column is not used by kind "image-classification" (only by sequence-classification); '
     'remove it'),
    (VALID.replace('["0", "1"]', '"0,1"'),
     'tasks.mnist.class_names must be a non-empty list of strings, not "0,1"; e.g. class_names = ["negative", '
     '"positive"]'),
    (VALID.replace("[tasks.mnist]", 'eval_batch_size = "64"\n[tasks.mnist]'),
     'eval_batch_size must be an integer, not "64"; e.g. eval_batch_size = 64'),
    (VALID.replace("base = \"openai/clip-vit-base-patch32\"", "base = true"),
     'base must be a string, not true; e.g. base = "openai/clip-vit-base-patch32"'),
    (VALID.replace('dataset = "ylecun/mnist"\n', ""),
     "missing key 'tasks.mnist.dataset'; add dataset = \"./data/mnist/{split}.parquet\" to [tasks.mnist] (hub id, "
     "save_to_disk folder, or parquet/json/jsonl/csv files with {split} in the path)"),
    (VALID.replace('base = "openai/clip-vit-base-patch32"\n', ""),
     "missing key 'base'; add base = \"openai/clip-vit-base-patch32\" to the top level (the pretrained checkpoint "
     "the experts were fine-tuned from: hub id or local folder)"),
    (VALID.replace('kind = "image-classification"\n', ""),
     'missing key \'kind\'; add kind = "image-classification" (or one of sequence-classification, lm-eval) to the '
     'top level'),
    (VALID.replace("image-classification", "image-clasification"),
     "unknown kind 'image-clasification'; did you mean: image-classification, sequence-classification?"),
    (VALID.split("[tasks")[0], 'no tasks; add one table per task, e.g. [tasks.mnist] with expert = "./experts/mnist"'),
    (VALID + "templates = [\"a photo of a {c}.\"]\n",
     "tasks.mnist.templates: 'a photo of a {c}.' must contain {} exactly once (where the class name goes), e.g. "
     "\"a photo of a {}.\""),
    (VALID.replace('["0", "1"]', '["0", "0"]'),
     "tasks.mnist.class_names lists '0' twice; class names must be unique"),
    (VALID + 'eval_split = ""\n', 'tasks.mnist.eval_split is empty; e.g. eval_split = "test"'),
    (VALID.replace("[tasks.mnist]", 'protocol = "online"\n[tasks.mnist]'),
     "protocol = 'online' is not one of transductive, inductive"),
    (VALID.replace('"tanganke/clip-vit-base-patch32_mnist"', '"my experts/mnist"'),
     "tasks.mnist.expert = 'my experts/mnist' is neither a local path nor a hub id; start a local path with ./ "
     "(relative to the suite file), ../ or /, or write a hub id as owner/name"),
    ('kind = "lm-eval"\nbase = "gpt2"\n[tasks.arc]\nexpert = "./experts/arc"\n',
     "missing key 'tasks.arc.lm_eval_task'; add lm_eval_task = \"arc_easy\" to [tasks.arc] (the lm-eval task name)"),
    ('kind = "lm-eval"\nbase = "gpt2"\n[tasks.arc]\nexpert = "./e"\nlm_eval_task = "arc"\ntask_yaml = "t.yaml"\n',
     "tasks.arc.task_yaml = 't.yaml' must be a local path; start it with ./ (relative to the suite file), ../ or /"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_every_problem_is_one_line_naming_file_key_and_fix(tmp_path, text, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(BenchError) as error:
        read_suite_file(path)
    assert str(error.value) == f"{path}: {message}"


def test_invalid_toml_and_missing_file(tmp_path):
    path = write(tmp_path / "broken.toml", "kind = \n")
    with pytest.raises(BenchError, match=rf"^{path}: not valid TOML: "):
        read_suite_file(path)
    with pytest.raises(BenchError) as error:
        get_suite(str(tmp_path / "absent.toml"))
    assert str(error.value) == (f"suite file '{tmp_path / 'absent.toml'}' not found; pass --suite path/to/suite.toml "
                                f"or a suite name (see `bench list suites`)")


def test_cli_reports_a_bad_file_on_one_line_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path / "bad.toml", VALID.replace("class_names", "clas_names"))
    code, out, err = run_cli(capsys, "run", "--suite", str(path), "--methods", "pretrained", "--results",
                             str(tmp_path / "results"), "--cache", str(tmp_path / "cache"), "--no-progress")
    assert (code, out) == (2, "")
    assert err == f"bench: error: {path}: unknown key 'tasks.mnist.clas_names'; did you mean: class_names?\n"
    assert not (tmp_path / "results").exists()


def test_suite_files_are_not_listed_and_their_parameters_are_fixed(tmp_path, capsys):
    path = write(tmp_path / "ok.toml", VALID)
    spec = get_suite(str(path))
    assert spec.name == "custom:ok" and get_suite("custom:ok") is spec
    params = build_params("suite", spec.params, {"eval_batch_size": "7"})
    assert params.sha256 == read_suite_file(path).sha256 and params.file == str(path.resolve())
    assert (params.eval_batch_size, params.protocol) == (7, "transductive")
    with pytest.raises(BenchError, match=r"^suite\.sha256=abc is not one of "):
        build_params("suite", spec.params, {"sha256": "abc"})
    _, listing, _ = run_cli(capsys, "list", "suites", "--cache", str(tmp_path))
    assert "custom" not in listing
    with pytest.raises(BenchError) as error:
        get_suite("custom:elsewhere")
    assert str(error.value) == ("suite 'custom:elsewhere' comes from a suite file; pass the file's path instead, e.g. "
                                "--suite path/to/elsewhere.toml")


# -- image classification ------------------------------------------------------------------------------------------


def run_suite(capsys, root: Path, suite: str, results: Path, *extra: str, methods: str = "pretrained") -> tuple:
    return run_cli(capsys, "run", "--suite", suite, "--methods", methods, "--cache", str(root / "cache"),
                   "--results", str(results), "--out", str(results.parent / "reports"), "--no-progress", *extra)


def test_image_suite_runs_end_to_end_from_local_folders_files_and_hub_ids(vision, tmp_path, capsys, monkeypatch):
    write(vision / "mixed.toml", MIXED)
    monkeypatch.chdir(vision)
    results = tmp_path / "results"
    code, out, err = run_suite(capsys, vision, "mixed.toml", results, methods="pretrained,individual,task_arithmetic")
    assert code == 0, err
    by_method = {r["method"]: r for r in records(results)}
    assert set(by_method) == {"pretrained", "individual", "task_arithmetic"}
    suite = read_suite_file(vision / "mixed.toml")
    for record in by_method.values():
        assert set(record["tasks"]) == {"mnist", "eurosat"}
        assert record["tasks"]["mnist"]["num_examples"] == 12 and record["tasks"]["eurosat"]["num_examples"] == 12
        assert record["suite_params"] == {
            "file": str(vision / "mixed.toml"), "sha256": suite.sha256, "eval_batch_size": 128,
            "protocol": "transductive", "references": json.dumps(suite.references(), sort_keys=True)}
        assert record["problem"]["kind"] == "image-classification"
    assert "task_arithmetic" in out and "eurosat" in out


def test_records_go_under_the_suite_name_whatever_the_path(vision, tmp_path, capsys):
    path = write(vision / "named.toml", MIXED)
    results = tmp_path / "results"
    code, out, err = run_suite(capsys, vision, str(path), results)
    assert code == 0, err
    assert sorted(p.relative_to(results).parts[:2] for p in results.rglob("*.json")) == [
        ("custom:named", "individual"), ("custom:named", "pretrained")]
    assert "custom:named — protocol: transductive" in out


def test_image_suite_equals_vit8_on_the_same_artefacts(vision):
    text = ('kind = "image-classification"\nbase = "openai/clip-vit-base-patch32"\n'
            + "".join(image_task(t, fv.BACKBONE.hf_expert_prefix + TASK_SPECS[t].hf_expert, TASK_SPECS[t].dataset)
                      for t in TASKS))
    spec = get_suite(str(write(vision / "like_vit8.toml", text)))
    custom = spec.fn(build_params("suite", spec.params, {}), vision / "cache", False)
    reference = build_vit("vit8", VitParams(tasks="mnist,eurosat"), vision / "cache", False)
    assert custom.tasks == TASKS == reference.tasks
    base = custom.pretrained()
    assert list(base) == list(reference.pretrained())
    assert all(torch.equal(base[k], reference.pretrained()[k]) for k in base)
    for task in TASKS:
        assert all(torch.equal(custom.expert(task)[k], reference.expert(task)[k]) for k in base)
        assert torch.allclose(custom.heads[task].class_embeddings, reference.heads[task].class_embeddings)
        inputs = reference.inputs(task, "test")
        assert torch.equal(custom.inputs(task, "test"), inputs)
        assert torch.allclose(custom.logits(base, task, inputs), reference.logits(base, task, inputs), atol=1e-5)
        assert torch.equal(custom.split(task, "train").labels, reference.split(task, "train").labels)


def test_hub_id_not_in_the_cache_names_it_and_bench_prepare(vision, tmp_path, capsys, monkeypatch):
    write(vision / "uncached.toml", MIXED.replace("tanganke/clip-vit-base-patch32_eurosat", "someone/not-cached"))
    monkeypatch.chdir(vision)
    code, out, err = run_suite(capsys, vision, "uncached.toml", tmp_path / "results")
    assert (code, out) == (2, "")
    assert err == (f"bench: error: suite 'uncached.toml' needs checkpoint someone/not-cached (tasks.eurosat.expert), "
                   f"which is not in the cache {vision / 'cache'}; run `bench prepare uncached.toml` on a machine with "
                   f"hub access (same --cache/BENCH_CACHE), then rerun\n")
    assert not (tmp_path / "results").exists()


def test_missing_local_checkpoint_and_dataset_name_key_and_path(vision, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(vision)
    write(vision / "nolocal.toml", MIXED.replace("./local/mnist_expert", "./local/nope"))
    code, _, err = run_suite(capsys, vision, "nolocal.toml", tmp_path / "results")
    assert (code, err) == (2, f"bench: error: nolocal.toml: tasks.mnist.expert: no checkpoint folder "
                              f"{vision / 'local' / 'nope'}; fix the path (relative paths start at the suite "
                              f"file's folder)\n")
    write(vision / "nodata.toml", MIXED.replace("{split}.parquet", "{split}.csv"))
    code, _, err = run_suite(capsys, vision, "nodata.toml", tmp_path / "results")
    assert (code, err) == (2, f"bench: error: nodata.toml: tasks.eurosat.dataset: no dataset at "
                              f"{vision / 'local' / 'eurosat' / 'test.csv'} for the test split; fix the path "
                              f"(relative paths start at the suite file's folder; {{split}} in it stands for the "
                              f"split's name)\n")
    assert not (tmp_path / "results").exists()


def test_an_expert_of_another_shape_fails_before_any_work_naming_the_first_tensor(vision, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.chdir(vision)
    write(vision / "shapes.toml",
          MIXED.replace("./local/mnist_expert", "./bad/hub/models/tanganke--clip-vit-base-patch32_mnist"))
    code, _, err = run_suite(capsys, vision, "shapes.toml", tmp_path / "results")
    assert (code, err) == (2, "bench: error: expert 'mnist' tensor 'vision_model.embeddings.position_embedding.weight' "
                              "has shape (10, 32), base has (5, 32); experts must be fine-tuned from the same base\n")
    assert not (tmp_path / "results").exists()


def test_resume_is_exact_and_editing_the_file_is_a_new_configuration(vision, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(vision)
    path = write(vision / "resume.toml", MIXED)
    results = tmp_path / "results"
    assert run_suite(capsys, vision, "resume.toml", results)[0] == 0
    first = {r["config_hash"] for r in records(results)}
    assert len(first) == 2  # pretrained and the individual reference row
    code, _, err = run_suite(capsys, vision, "resume.toml", results, "--resume")
    assert code == 0 and "resume: 1 of 1 configurations already recorded" in err
    assert "0 run(s) computed, 1 already recorded" in err
    path.write_text(MIXED.replace("[tasks.eurosat]", "# a comment changes the content, so the configuration\n"
                                                     "[tasks.eurosat]"))
    code, _, err = run_suite(capsys, vision, "resume.toml", results, "--resume")
    assert code == 0 and "2 run(s) computed, 0 already recorded" in err
    second = {r["config_hash"] for r in records(results)} - first
    assert len(second) == 2
    shas = {r["suite_params"]["sha256"] for r in records(results)}
    assert len(shas) == 2


def test_prepare_fills_the_cache_for_the_hub_ids_of_a_suite_file(vision, tmp_path, capsys, monkeypatch):
    """``bench prepare path/to/suite.toml`` with the hub clients replaced by copies from the fixture cache."""
    source = vision / "cache"

    def fake_model(repo_id, folder, allow_patterns=None):
        for path in _hub.model_dir(source, repo_id).iterdir():
            if path.name != _hub.MARKER and any(Path(path.name).match(p) for p in allow_patterns or ["*"]):
                shutil.copy(path, Path(folder) / path.name)

    def fake_dataset(repo_id, split, folder, config=None):
        shutil.copytree(_hub.dataset_dir(source, repo_id, split, config), folder, dirs_exist_ok=True)

    monkeypatch.setattr(_hub, "download_model", fake_model)
    monkeypatch.setattr(_hub, "download_dataset", fake_dataset)
    monkeypatch.chdir(vision)
    write(vision / "prep.toml", MIXED)
    cache = tmp_path / "cache"
    spec = get_suite("prep.toml")
    params = build_params("suite", spec.params, {})
    assert spec.missing(params, cache) == [
        "checkpoint tanganke/clip-vit-base-patch32_eurosat (tasks.eurosat.expert)",
        "dataset ylecun/mnist, test split (tasks.mnist.dataset)",
        "dataset ylecun/mnist, train split (tasks.mnist.dataset)",
    ]
    code, out, err = run_cli(capsys, "prepare", "prep.toml", "--cache", str(cache), "--no-progress")
    assert (code, out) == (0, f"custom:prep is ready in {cache}\n"), err
    assert spec.missing(params, cache) == []


def test_methods_that_need_a_missing_split_are_skipped_with_the_reason(vision, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(vision)
    write(vision / "nosplit.toml", MIXED.replace('train_split = "train"\n', ""))
    code, _, err = run_suite(capsys, vision, "nosplit.toml", tmp_path / "results", "--set", "suite.protocol=inductive",
                             methods="adamerging_tw")
    assert code == 0, err
    assert ("not applicable: adamerging_tw: task 'mnist' of custom:nosplit has no unlabeled data; add "
            "tasks.mnist.unlabeled_split (or train_split) to the suite file") in err


# -- sequence classification -------------------------------------------------------------------------------------

TEXT_WORDS = ["<eos>", "the", "movie", "was", "good", "bad", "it", "a", "cat", "dog", "is"]


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<eos>", unk_token="<eos>")


def save_tiny_sequence_classifiers(root: Path) -> None:
    """A GPT-2 base saved as a causal LM with its tokenizer (no padding token, like the hub's ``gpt2``), two
    GPT2ForSequenceClassification experts (2 and 3 classes), an expert of another width, and the tasks' data: csv
    files with class-name labels, and a DatasetDict of sentence pairs with class ids."""
    import datasets
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = dict(vocab_size=len(TEXT_WORDS), n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                  eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**config)).eval()
    base.save_pretrained(root / "base")
    word_tokenizer(TEXT_WORDS).save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    for task, labels, width in (("sentiment", 2, 16), ("animals", 3, 16), ("wide", 2, 24)):
        expert = GPT2ForSequenceClassification(GPT2Config(**{**config, "n_embd": width}, num_labels=labels,
                                                          pad_token_id=0))
        if width == 16:
            expert.transformer.load_state_dict(base.transformer.state_dict())
        with torch.no_grad():
            for tensor in expert.transformer.parameters():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
        expert.save_pretrained(root / "experts" / task)
    for split, repeat in (("test", 3), ("train", 4)):
        rows = [("the movie was good", "positive"), ("the movie was bad it was bad", "negative")] * repeat
        write(root / "data" / f"sentiment_{split}.csv",
              "review,sentiment\n" + "".join(f"{text},{label}\n" for text, label in rows))
    pairs = {split: datasets.Dataset.from_dict({"a": ["a cat", "a dog", "it is a cat"] * n,
                                                "b": ["the cat", "the dog", "a dog"] * n, "label": [0, 1, 2] * n})
             for split, n in (("test", 2), ("train", 3))}
    datasets.DatasetDict(pairs).save_to_disk(str(root / "data" / "animals"))


TEXT_SUITE = """kind = "sequence-classification"
base = "./base"
[tasks.sentiment]
expert = "./experts/sentiment"
dataset = "./data/sentiment_{split}.csv"
train_split = "train"
text_column = "review"
label_column = "sentiment"
class_names = ["negative", "positive"]
[tasks.animals]
expert = "./experts/animals"
dataset = "./data/animals"
train_split = "train"
text_column = "a"
text_pair_column = "b"
class_names = ["cat", "dog", "both"]
"""


@pytest.fixture(scope="module")
def text_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom-text")
    save_tiny_sequence_classifiers(root)
    return root


def test_sequence_suite_merges_the_backbone_and_keeps_each_task_head(text_models, tmp_path, capsys, monkeypatch):
    write(text_models / "text.toml", TEXT_SUITE)
    monkeypatch.chdir(text_models)
    results = tmp_path / "results"
    code, out, err = run_cli(capsys, "run", "--suite", "text.toml", "--methods",
                             "pretrained,individual,task_arithmetic,regmean", "--set", "regmean.num_samples=6",
                             "--cache", str(tmp_path / "cache"), "--results", str(results), "--out",
                             str(tmp_path / "reports"), "--no-progress")
    assert code == 0, err
    by_method = {r["method"]: r for r in records(results)}
    assert set(by_method) == {"pretrained", "individual", "task_arithmetic", "regmean"}
    for record in by_method.values():
        assert {t: e["num_examples"] for t, e in record["tasks"].items()} == {"sentiment": 6, "animals": 6}
    problem = by_method["pretrained"]["problem"]
    assert problem["num_classes"] == {"sentiment": 2, "animals": 3} and problem["backbone_prefix"] == "transformer."
    spec = get_suite("text.toml")
    built = spec.fn(build_params("suite", spec.params, {}), tmp_path / "cache", False)
    assert all(key.startswith("transformer.") for key in built.pretrained())
    assert set(built.heads["animals"]) == {"score.weight"} and built.heads["animals"]["score.weight"].shape == (3, 16)
    assert built.split("sentiment", "test").labels.tolist() == [1, 0] * 3  # class names mapped to ids
    inputs = built.split("animals", "test").images
    assert built.logits(built.pretrained(), "animals", inputs).shape == (6, 3)


def test_sequence_suite_checks_heads_labels_and_shapes(text_models, tmp_path):
    cases = [
        (TEXT_SUITE.replace('["cat", "dog", "both"]', '["cat", "dog"]'),
         "tasks.animals.class_names: lists 2 classes but the expert's head has 3 outputs; list one name per output"),
        (TEXT_SUITE.replace('["negative", "positive"]', '["neg", "positive"]'),
         "tasks.sentiment.class_names: tasks.sentiment.dataset (test split) has label 'negative', which is not a "
         "class name; add it to class_names"),
        (TEXT_SUITE.replace('text_column = "review"', 'text_column = "reviews"'),
         "tasks.sentiment: tasks.sentiment.dataset (test split) has no column 'reviews'; did you mean: review?"),
    ]
    for text, message in cases:
        path = write(text_models / "check.toml", text)
        spec = get_suite(str(path))
        with pytest.raises(BenchError) as error:
            spec.fn(build_params("suite", spec.params, {}), tmp_path / "cache", False)
        assert str(error.value) == f"{path}: {message}"
    spec = get_suite(str(write(text_models / "wide.toml", TEXT_SUITE.replace("./experts/animals", "./experts/wide")
                                                                    .replace('["cat", "dog", "both"]',
                                                                             '["cat", "dog"]'))))
    with pytest.raises(BenchError) as error:
        spec.fn(build_params("suite", spec.params, {}), tmp_path / "cache", False)
    assert str(error.value) == ("expert 'animals' tensor 'transformer.wte.weight' has shape (11, 24), base has "
                                "(11, 16); experts must be fine-tuned from the same base")


# -- lm-eval -----------------------------------------------------------------------------------------------------------

WORDS = ["<eos>", "the", "movie", "was", "good", "bad", "answer", ":", "positive", "negative", "sky", "grass", "is",
         "blue", "green"]
LM_ROWS = {"sentiment": ([("the movie was good answer :", 0), ("the movie was bad answer :", 1)] * 3,
                         ["positive", "negative"]),
           "colour": ([("the sky is answer :", 0), ("the grass is answer :", 1)] * 3, ["blue", "green"])}


def save_tiny_causal_lm(root: Path) -> None:
    """Base GPT-2 LM + word-level tokenizer, two perturbed experts, and one lm-eval task per expert."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from suites._lm import write_multiple_choice_task

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<eos>",
                                   unk_token="<eos>", pad_token="<eos>")
    config = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    base.save_pretrained(root / "base")
    fast.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    for task, (rows, choices) in LM_ROWS.items():
        expert = GPT2LMHeadModel(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for tensor in expert.parameters():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
        expert.save_pretrained(root / "experts" / task)
        data = write(root / "data" / f"{task}.jsonl",
                     "".join(json.dumps({"prompt": p, "label": label}) + "\n" for p, label in rows))
        write_multiple_choice_task(root / "lm_eval_tasks" / f"tiny_{task}.yaml", f"tiny_{task}", data, choices,
                                   root / "hf_datasets")


LM_SUITE = """kind = "lm-eval"
base = "./base"
[tasks.sentiment]
expert = "./experts/sentiment"
lm_eval_task = "tiny_sentiment"
task_yaml = "./lm_eval_tasks/tiny_sentiment.yaml"
[tasks.colour]
expert = "./experts/colour"
lm_eval_task = "tiny_colour"
task_yaml = "./lm_eval_tasks"
"""


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom-lm")
    save_tiny_causal_lm(root)
    return root


def test_lm_eval_suite_runs_data_free_methods_and_skips_the_others(causal_lm, tmp_path, capsys, monkeypatch):
    write(causal_lm / "lm.toml", LM_SUITE)
    monkeypatch.chdir(causal_lm)
    results = tmp_path / "results"
    code, out, err = run_cli(capsys, "run", "--suite", "lm.toml", "--methods",
                             "pretrained,individual,task_arithmetic,adamerging_tw", "--cache", str(tmp_path / "cache"),
                             "--results", str(results), "--out", str(tmp_path / "reports"), "--no-progress")
    assert code == 0, err
    by_method = {r["method"]: r for r in records(results)}
    assert set(by_method) == {"pretrained", "individual", "task_arithmetic"}
    for record in by_method.values():
        assert {t: e["num_examples"] for t, e in record["tasks"].items()} == {"sentiment": 6, "colour": 6}
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in record["tasks"].values())
    assert by_method["pretrained"]["problem"]["lm_eval_tasks"] == {"sentiment": "tiny_sentiment",
                                                                   "colour": "tiny_colour"}
    assert ("not applicable: adamerging_tw: suite custom:lm cannot give class_logits or unlabeled_data (per-class "
            "logits of the merged model on a task's inputs (a forward to optimise through); unlabeled inputs of each "
            "task (the protocol's adaptation split))") in err


def test_lm_eval_unknown_task_name_is_one_line(causal_lm, tmp_path, capsys):
    path = write(causal_lm / "typo.toml", LM_SUITE.replace('"tiny_colour"', '"tiny_color"'))
    spec = get_suite(str(path))
    with pytest.raises(BenchError) as error:
        spec.fn(build_params("suite", spec.params, {}), tmp_path / "cache", False)
    assert str(error.value) == (f"{path}: tasks.colour.lm_eval_task: no task 'tiny_color' in the task files "
                                f"({causal_lm / 'lm_eval_tasks'}); did you mean: tiny_colour?")
