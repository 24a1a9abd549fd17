"""Facts the real suites share with their references (FusionBench, MergeBench, the hub datasets), pinned.

Each expected value was read from the reference itself: the hub dataset's class labels, FusionBench's STS-B
scoring, MergeBench's lm-eval task list, the installed lm-eval's task YAMLs.
"""

import math

import pytest
import torch

from suites import _hub, _vit_tasks, glue, llm
from suites._lm import LmEvalScore

# ----------------------------------------------------------------------------------------------------------
# CIFAR-100 (vit14 / vit20)
# ----------------------------------------------------------------------------------------------------------


def test_cifar100_has_100_classes_and_spells_class_26_as_the_hub_label_cra():
    classes = _vit_tasks.CIFAR100_CLASSES
    assert len(classes) == 100 and len(set(classes)) == 100
    assert classes[25:28] == ("couch", "cra", "crocodile")
    assert (classes[0], classes[99]) == ("apple", "worm")
    assert _vit_tasks.TASK_SPECS["cifar100"].class_names == classes
    assert "crab cakes" in _vit_tasks.FOOD101_CLASSES


# ----------------------------------------------------------------------------------------------------------
# STS-B (glue-flan-t5)
# ----------------------------------------------------------------------------------------------------------


def test_stsb_spearman_ranks_the_gold_scores_rounded_to_one_decimal():
    from scipy.stats import spearmanr

    predictions = [1.0, 2.0, 3.0, 4.0]
    gold = [2.04, 2.01, 3.0, 4.0]  # rounded: 2.0, 2.0, 3.0, 4.0 -- the first two become a tie
    # raw gold ranks 2,1,3,4: Σd² = 2, ρ = 1 - 6·2/(4·15) = 0.8
    assert glue.spearman(predictions, gold) == pytest.approx(0.8)
    # rounded gold ranks 1.5,1.5,3,4: Pearson of the ranks = 4.5 / sqrt(5 · 4.5) = sqrt(0.9)
    assert glue.stsb_spearman(predictions, gold) == pytest.approx(math.sqrt(0.9))
    assert glue.stsb_spearman(predictions, gold) == pytest.approx(spearmanr(predictions, [2.0, 2.0, 3.0, 4.0])[0])


def test_stsb_spearman_rounds_float32_gold_like_its_target_text():
    # a float32 label 3.8 reads back as 3.799999952316284; its target text "3.8" ties it with a gold 3.8
    from_float32 = float(torch.tensor(3.8, dtype=torch.float32))
    assert from_float32 != 3.8
    predictions = [2.0, 1.0, 0.0]
    # untied gold ranks 2,3,1 against 3,2,1 would give ρ = 0.5; tied ranks 2.5,2.5,1 give sqrt(3)/2
    assert glue.stsb_spearman(predictions, [from_float32, 3.8, 1.0]) == pytest.approx(math.sqrt(3) / 2)


# ----------------------------------------------------------------------------------------------------------
# llm-mergebench (MergeBench's lm-eval tasks)
# ----------------------------------------------------------------------------------------------------------

MULTILINGUAL = ["m_mmlu_fr", "m_mmlu_es", "m_mmlu_de", "m_mmlu_ru", "arc_fr", "arc_es", "arc_de", "arc_ru",
                "hellaswag_fr", "hellaswag_es", "hellaswag_de", "hellaswag_ru"]
MATH_SUBJECTS = [("algebra", "algebra"), ("counting_and_prob", "counting_and_probability"),
                 ("geometry", "geometry"), ("intermediate_algebra", "intermediate_algebra"),
                 ("num_theory", "number_theory"), ("prealgebra", "prealgebra"), ("precalc", "precalculus")]


def test_mergebench_default_domains_score_mergebench_lm_eval_tasks():
    assert llm.LlmParams().domains() == {
        "instruction": ["ifeval"],
        "math": ["gsm8k_cot", "hendrycks_math"],
        "multilingual": MULTILINGUAL,
    }


def test_every_default_mergebench_task_is_an_installed_lm_eval_task_with_its_hub_dataset():
    """Looking the default task map up in the installed lm-eval's full index (seconds): every name resolves, the
    hendrycks_math group to its seven subject tasks, each with the dataset and splits its YAML reads."""
    found = [(s.task, s.dataset_path, s.dataset_name, s.splits, s.group) for s in llm.task_sources(llm.LlmParams())]
    languages = ("fr", "es", "de", "ru")
    assert found == [
        ("ifeval", "google/IFEval", None, ("train",), None),
        ("gsm8k_cot", "openai/gsm8k", "main", ("test",), None),
        *[(f"hendrycks_math_{task}", "EleutherAI/hendrycks_math", config, ("train", "test"), "hendrycks_math")
          for task, config in MATH_SUBJECTS],
        *[(f"m_mmlu_{lang}", "alexandrainst/m_mmlu", lang, ("test", "train"), None) for lang in languages],
        *[(f"arc_{lang}", "alexandrainst/m_arc", lang, ("train", "validation", "test"), None) for lang in languages],
        *[(f"hellaswag_{lang}", "alexandrainst/m_hellaswag", lang, ("val",), None) for lang in languages],
    ]


def test_a_math_subject_task_reads_its_dataset_from_the_cache(tmp_path):
    """A hendrycks_math subtask includes lm-eval's YAML, whose process_docs lives beside the included file."""
    import datasets
    from lm_eval.tasks import TaskManager

    source = next(s for s in llm.task_sources(llm.LlmParams()) if s.task == "hendrycks_math_counting_and_prob")
    for split in source.splits:
        folder = source.folder(tmp_path, split)
        datasets.Dataset.from_dict({"problem": ["Two coins: how many outcomes?"] * 2,
                                    "solution": ["There are $2 \\cdot 2 = \\boxed{4}$."] * 2,
                                    "level": ["Level 1"] * 2, "type": ["Counting & Probability"] * 2}
                                   ).save_to_disk(str(folder))
        _hub.mark_complete(folder)
    include = llm.write_local_tasks([source], tmp_path)
    task = TaskManager(include_path=str(include), include_defaults=False).load([source.task])["tasks"][source.task]
    docs = list(task.test_docs())
    assert len(docs) == 2 and task.doc_to_target(docs[0]) == "4"


def _score(bits: list[int]) -> LmEvalScore:
    return LmEvalScore(metric="exact_match", value=sum(bits) / len(bits), correct=torch.tensor(bits, dtype=torch.bool),
                       loss=math.nan)


def test_a_group_in_a_domain_runs_its_subtasks_and_scores_the_mean_over_all_their_docs(monkeypatch):
    runs = []

    def fake_evaluate_merged(runner, merged, model, tokenizer, params, tasks, device, batch_size, **kwargs):
        runs.append(list(tasks))
        return {"gsm8k_cot": _score([1, 0]), "hendrycks_math_algebra": _score([1, 1]),
                "hendrycks_math_geometry": _score([1, 0, 0, 0, 0, 0])}

    monkeypatch.setattr(llm, "evaluate_merged", fake_evaluate_merged)
    model = torch.nn.Linear(2, 2)
    weights = {name: value.detach().clone() for name, value in model.named_parameters()}
    problem = llm.LlmProblem(model=model, tokenizer=None, pretrained=weights, experts={"math": weights}, runner=None,
                             facts={}, domain_tasks={"math": ["gsm8k_cot", "hendrycks_math"]}, batch_size=1,
                             groups={"hendrycks_math": ["hendrycks_math_algebra", "hendrycks_math_geometry"]})
    metrics = problem.evaluate(weights, "math", torch.device("cpu"))
    assert runs == [["gsm8k_cot", "hendrycks_math_algebra", "hendrycks_math_geometry"]]
    # hendrycks_math: 3 of its 8 docs = 0.375 (not the subtasks' plain mean, 7/12); the domain: (0.5 + 0.375) / 2
    assert metrics.accuracy == pytest.approx(0.4375)
    assert metrics.correct.tolist() == [True, False, True, True, True, False, False, False, False, False]
    assert math.isnan(metrics.loss)
