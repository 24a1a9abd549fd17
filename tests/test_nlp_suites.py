"""glue-gpt2, glue-flan-t5 and llm-mergebench end to end on tiny artefacts in the cache's real layout.

Each test builds its checkpoints and datasets with tests/fixtures_nlp.py (seconds, offline), runs the real code
path through `bench run`, and checks the scores against an independent computation with transformers / lm-eval
directly, plus the one-line errors for a missing artefact and for an expert of another shape.
"""

import json
import math
import shutil
import tempfile
from pathlib import Path

import fixtures_nlp as fx
import pytest
import torch
import yaml

from bench import registry
from bench.cli import main
from bench.store import unpack_correct
from suites import _hub, glue, llm
from suites._lm import from_pretrained

GPT2_SET = ["--set", f"suite.base_model={fx.GPT2_BASE}", "--set", f"suite.expert_template={fx.GPT2_EXPERTS}",
            "--set", f"suite.dataset={fx.GLUE}", "--set", "suite.tasks=sst2,rte"]
T5_SET = ["--set", f"suite.base_model={fx.T5_BASE}", "--set", f"suite.expert_template={fx.T5_EXPERTS}",
          "--set", f"suite.dataset={fx.GLUE}", "--set", "suite.tasks=sst2,stsb"]
SHORT = ["--set", "adamerging_tw.steps=3", "--set", "samerging.num_batches=2", "--set", "samerging.epochs=1",
         "--set", "fisher.num_samples=6", "--set", "regmean.num_samples=6"]
DATA_METHODS = "pretrained,individual,task_arithmetic,ties,adamerging_tw,samerging,fisher,regmean"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins on a shared machine
    yield
    torch.set_num_threads(previous)


def run(root: Path, suite: str, settings: list[str], methods: str) -> int:
    return main(["run", "--suite", suite, "--cache", str(root / "cache"), "--results", str(root / "results"),
                 "--out", str(root / "reports"), "--no-progress", "--methods", methods, *settings])


def records(root: Path) -> dict[str, dict]:
    found = {}
    for path in (root / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        found[record["method"]] = record
    return found


def correct_bits(record: dict, task: str) -> list[bool]:
    entry = record["tasks"][task]
    return unpack_correct(entry["correct"], entry["num_examples"]).tolist()


def glue_rows(cache: Path, task: str, split: str):
    return glue.load_split(_hub.dataset_dir(cache, fx.GLUE, split, config=task))


# ----------------------------------------------------------------------------------------------------------
# glue-gpt2
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue-gpt2")
    fx.make_glue_gpt2(root / "cache")
    assert run(root, "glue-gpt2", [*GPT2_SET, *SHORT], DATA_METHODS) == 0
    return root, records(root)


def hf_predictions(model, tokenizer, rows, fields) -> torch.Tensor:
    """Class predictions of a GPT2ForSequenceClassification, one unpadded example at a time."""
    predictions = []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(*[row[f] for f in fields], return_tensors="pt")["input_ids"]
            predictions.append(int(model(input_ids=ids).logits[0].argmax()))
    return torch.tensor(predictions)


def test_glue_gpt2_runs_every_data_using_method(gpt2_run):
    _, found = gpt2_run
    assert set(found) == set(DATA_METHODS.split(","))
    for name, record in found.items():
        assert set(record["tasks"]) == {"sst2", "rte"}, name
        assert all(entry["num_examples"] == 12 for entry in record["tasks"].values()), name


def test_glue_gpt2_scores_match_transformers(gpt2_run):
    """The functional forward (backbone merged, Conv1D in linear layout, own head) reproduces HF's model."""
    from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

    root, found = gpt2_run
    cache = root / "cache"
    tokenizer = AutoTokenizer.from_pretrained(str(_hub.model_dir(cache, fx.GPT2_BASE)))
    base = from_pretrained(GPT2LMHeadModel, _hub.model_dir(cache, fx.GPT2_BASE))
    for task in ("sst2", "rte"):
        rows = glue_rows(cache, task, "validation")
        labels = torch.tensor(list(rows["label"]))
        expert = from_pretrained(GPT2ForSequenceClassification,
                                 _hub.model_dir(cache, fx.GPT2_EXPERTS.format(task=task)))
        fields = glue.GLUE_TASKS[task].text_fields
        individual = hf_predictions(expert, tokenizer, rows, fields) == labels
        assert correct_bits(found["individual"], task) == individual.tolist()
        expert.transformer.load_state_dict(base.transformer.state_dict())  # pretrained backbone, task's own head
        pretrained = hf_predictions(expert, tokenizer, rows, fields) == labels
        assert correct_bits(found["pretrained"], task) == pretrained.tolist()


def test_glue_gpt2_problem_exposes_linear_layout_and_real_token_inputs(gpt2_run):
    root, _ = gpt2_run
    params = registry.build_params("suite", glue.GlueGpt2Params, {
        "base_model": fx.GPT2_BASE, "expert_template": fx.GPT2_EXPERTS, "dataset": fx.GLUE, "tasks": "sst2,rte"})
    problem = glue.load_gpt2(params, root / "cache", "glue-gpt2")
    base = problem.pretrained()
    assert all(key.startswith("transformer.") for key in base)
    width = base["transformer.wpe.weight"].shape[1]
    assert base["transformer.h.0.mlp.c_fc.weight"].shape == (4 * width, width)  # [out, in], as nn.Linear
    inputs, labels = problem.labeled("rte", 5, seed=0)
    assert labels.shape == (5,) and problem.logits(base, "rte", inputs).shape == (5, 2)
    captured = problem.linear_inputs(base, "rte", inputs)
    assert set(captured) == problem.merged.transposed
    assert all(x.shape[0] == int((inputs >= 0).sum()) for x in captured.values())


def test_glue_gpt2_missing_cache_is_one_line_naming_the_prepare_command(tmp_path, capsys):
    assert run(tmp_path, "glue-gpt2", GPT2_SET, "pretrained,task_arithmetic") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert f"checkpoint {fx.GPT2_BASE}" in err[0]
    assert "`bench prepare glue-gpt2 --set suite." in err[0] and "suite.tasks=sst2,rte" in err[0]
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))
    params = registry.build_params("suite", glue.GlueGpt2Params, {"tasks": "sst2,rte"})
    missing = registry.get_suite("glue-gpt2").missing(params, tmp_path / "cache")
    assert len(missing) == 1 + 2 + 4 and missing[0].startswith("checkpoint gpt2 ")


def test_glue_gpt2_expert_of_another_shape_fails_naming_the_first_tensor(tmp_path, capsys):
    fx.make_glue_gpt2(tmp_path / "cache", mismatched="rte")
    capsys.readouterr()
    assert run(tmp_path, "glue-gpt2", GPT2_SET, "pretrained,task_arithmetic") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "expert 'rte' tensor 'transformer.wte.weight' has shape" in err[0]
    assert not list((tmp_path / "results").rglob("*.json")) if (tmp_path / "results").exists() else True


def test_prepare_fetches_every_artefact_into_the_cache_layout(tmp_path, monkeypatch):
    fetched = []

    def fake_model(repo_id: str, folder: Path, allow_patterns=None) -> None:
        assert "*.safetensors" in allow_patterns and "*.bin" not in allow_patterns  # no TF/Flax/ONNX copies
        fetched.append(repo_id)
        (folder / "model.safetensors").write_text("{}")

    def fake_dataset(repo_id: str, split: str, folder: Path, config=None) -> None:
        fetched.append(f"{repo_id}/{config}/{split}")
        (folder / "state.json").write_text("{}")

    monkeypatch.setattr(_hub, "download_model", fake_model)
    monkeypatch.setattr(_hub, "download_dataset", fake_dataset)
    spec = registry.get_suite("glue-flan-t5")
    params = registry.build_params("suite", spec.params, {"tasks": "mnli,stsb"})
    spec.prepare(params, tmp_path, False)
    assert fetched == ["google/flan-t5-base", "tanganke/flan-t5-base_glue-mnli", "tanganke/flan-t5-base_glue-stsb",
                       "nyu-mll/glue/mnli/validation_matched", "nyu-mll/glue/mnli/train",
                       "nyu-mll/glue/stsb/validation", "nyu-mll/glue/stsb/train"]
    assert spec.missing(params, tmp_path) == []
    spec.prepare(params, tmp_path, False)  # complete folders are not fetched again
    assert len(fetched) == 7


# ----------------------------------------------------------------------------------------------------------
# glue-flan-t5
# ----------------------------------------------------------------------------------------------------------


def test_glue_flan_t5_generative_scores_match_transformers(tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    fx.make_glue_t5(tmp_path / "cache")
    assert run(tmp_path, "glue-flan-t5", [*T5_SET, *SHORT], DATA_METHODS) == 0
    found = records(tmp_path)
    assert set(found) == set(DATA_METHODS.split(","))
    cache = tmp_path / "cache"
    tokenizer = AutoTokenizer.from_pretrained(str(_hub.model_dir(cache, fx.T5_BASE)))
    for task in ("sst2", "stsb"):
        spec = glue.GLUE_TASKS[task]
        rows = glue_rows(cache, task, "validation")
        expert = from_pretrained(T5ForConditionalGeneration, _hub.model_dir(cache, fx.T5_EXPERTS.format(task=task)))
        texts = []
        with torch.no_grad():
            for row in rows:
                prompt = spec.prompt.format(**{f: row[f] for f in spec.text_fields})
                output = expert.generate(**tokenizer(prompt, return_tensors="pt"), max_length=10, do_sample=False)
                texts.append(tokenizer.decode(output[0], skip_special_tokens=True).strip())
        entry = found["individual"]["tasks"][task]
        if spec.regression:
            predicted = [glue.parse_score(t) for t in texts]
            rounded_gold = [round(g, 1) for g in rows["label"]]  # FusionBench ranks the one-decimal target text
            assert entry["accuracy"] == pytest.approx(glue.spearman(predicted, rounded_gold))
            hits = [abs(p - g) <= 0.5 for p, g in zip(predicted, rows["label"], strict=True)]
        else:
            hits = [t == spec.label_words[g] for t, g in zip(texts, rows["label"], strict=True)]
            assert entry["accuracy"] == pytest.approx(sum(hits) / len(hits))
        assert correct_bits(found["individual"], task) == hits
        assert entry["num_examples"] == 12 and math.isfinite(entry["loss"])


# ----------------------------------------------------------------------------------------------------------
# llm-mergebench
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def short_dir():
    """A short folder for the lm-eval task YAMLs: its path is a suite parameter, and the report's file names
    spell out every non-default suite parameter (pytest's tmp paths would exceed the file-name limit)."""
    folder = Path(tempfile.mkdtemp(prefix="lm", dir="/tmp" if Path("/tmp").is_dir() else None))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def llm_settings(tasks_dir: Path) -> list[str]:
    return ["--set", f"suite.base_model={fx.LLM_BASE}", "--set", f"suite.expert_template={fx.LLM_EXPERTS}",
            "--set", "suite.task_map=alpha=fixture_mc;beta=fixture_gen+fixture_mc",
            "--set", f"suite.lm_eval_include={tasks_dir}", "--set", "suite.dtype=float32"]


def test_llm_suite_scores_through_lm_eval_and_skips_what_it_cannot_supply(tmp_path, short_dir, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaForCausalLM

    fx.make_llm(tmp_path / "cache", short_dir)
    capsys.readouterr()
    assert run(tmp_path, "llm-mergebench", llm_settings(short_dir),
               "pretrained,individual,task_arithmetic,adamerging_tw,samerging,fisher,regmean") == 0
    err = capsys.readouterr().err
    for name in ("adamerging_tw", "samerging", "fisher", "regmean"):
        assert f"not applicable: {name}: suite llm-mergebench" in err
    found = records(tmp_path)
    assert set(found) == {"pretrained", "individual", "task_arithmetic"}
    individual = found["individual"]["tasks"]
    assert individual["alpha"]["num_examples"] == 10 and individual["beta"]["num_examples"] == 20
    # beta pools a generation task, which has no loss: recorded as null (records are strict JSON, never NaN)
    assert math.isfinite(individual["alpha"]["loss"]) and individual["beta"]["loss"] is None

    # the same expert scored by lm-eval directly, from disk, on the fixture task as written (hub-style dataset
    # path answered from the cache's Arrow files)
    cache = tmp_path / "cache"
    expert = from_pretrained(LlamaForCausalLM, _hub.model_dir(cache, fx.LLM_EXPERTS.format(domain="alpha")))
    tokenizer = AutoTokenizer.from_pretrained(str(_hub.model_dir(cache, fx.LLM_BASE)))
    arrow = sorted(str(p) for p in _hub.dataset_dir(cache, fx.QA_DATASET, "test").glob("*.arrow"))
    direct = tmp_path / "direct"
    direct.mkdir()
    (direct / "direct_mc.yaml").write_text(yaml.safe_dump({
        "task": "direct_mc", "include": str(short_dir / "fixture_mc.yaml"), "dataset_path": "arrow",
        "dataset_name": None, "dataset_kwargs": {"data_files": {"test": arrow}}}))
    output = lm_eval.simple_evaluate(model=lm_eval.models.huggingface.HFLM(pretrained=expert, tokenizer=tokenizer),
                                     tasks=["direct_mc"], bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(direct), include_defaults=False))
    assert individual["alpha"]["accuracy"] == pytest.approx(output["results"]["direct_mc"]["acc,none"])


def test_llm_suite_missing_dataset_names_it_and_the_prepare_command(tmp_path, short_dir, capsys):
    fx.make_llm(tmp_path / "cache", short_dir)
    (_hub.dataset_dir(tmp_path / "cache", fx.QA_DATASET, "test") / _hub.MARKER).unlink()
    capsys.readouterr()
    assert run(tmp_path, "llm-mergebench", llm_settings(short_dir), "pretrained") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "dataset fixture/qa, split test, of lm-eval task fixture_mc" in err[0]
    assert "`bench prepare llm-mergebench --set suite." in err[0]


def test_llm_task_map_is_validated():
    spec = registry.get_suite("llm-mergebench")
    with pytest.raises(Exception, match="DOMAIN=TASK"):
        registry.build_params("suite", spec.params, {"task_map": "math"})
    assert llm.parse_task_map("a=x+y;b=z") == {"a": ["x", "y"], "b": ["z"]}


def test_a_built_in_lm_eval_task_reads_its_dataset_from_the_cache(tmp_path):
    """lm-eval's own gsm8k_cot YAML (hub dataset openai/gsm8k) is included and pointed at cached Arrow files."""
    import datasets
    from lm_eval.tasks import TaskManager

    folder = _hub.dataset_dir(tmp_path, "openai/gsm8k", "test", config="main")
    datasets.Dataset.from_dict({"question": ["How many legs do 2 cats have?"] * 3,
                                "answer": ["Each has 4. #### 8"] * 3}).save_to_disk(str(folder))
    _hub.mark_complete(folder)
    params = registry.build_params("suite", llm.LlmParams, {"task_map": "math=gsm8k_cot"})
    sources = llm.task_sources(params)
    assert [(s.task, s.dataset_path, s.dataset_name, s.splits) for s in sources] == [
        ("gsm8k_cot", "openai/gsm8k", "main", ("test",))]
    assert registry.get_suite("llm-mergebench").missing(params, tmp_path)[0].startswith("checkpoint meta-llama/")
    include = llm.write_local_tasks(sources, tmp_path)
    task = TaskManager(include_path=str(include), include_defaults=False).load(["gsm8k_cot"])["tasks"]["gsm8k_cot"]
    docs = list(task.test_docs())
    assert len(docs) == 3 and task.doc_to_target(docs[0]) == "8"
    assert task.config.num_fewshot == 8  # the rest of lm-eval's configuration is kept
