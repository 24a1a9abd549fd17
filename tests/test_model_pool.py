"""Experts read one tensor at a time from safetensors: equal results, metadata-only checks, bounded memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.errors import BenchError
from bench.model_pool import InMemoryWeights, MappedWeights, ModelPool, SafetensorsWeights, check_compatible, mapped
from methods.consensus import consensus_merge
from methods.dare import dare_ta_merge, dare_ties_merge
from methods.iso import iso_c_merge
from methods.task_arithmetic import task_arithmetic_merge
from methods.ties import ties_merge
from methods.tsv import tsv_merge
from methods.weight_averaging import weight_average

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SHAPES = {"a.weight": (70, 40), "a.bias": (70,), "b.weight": (33, 70), "conv": (4, 3, 2, 2)}


def random_model(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if base is None:
        model = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    else:
        model = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}
    model["position_ids"] = torch.arange(5)  # integer buffer: copied from the base, never merged
    return model


@pytest.fixture()
def models(tmp_path):
    base = random_model(0)
    experts = [random_model(seed, {k: v for k, v in base.items() if k != "position_ids"}) for seed in (1, 2, 3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    for index, expert in enumerate(experts):
        save_file(expert, str(tmp_path / f"expert{index}.safetensors"))
    readers = [SafetensorsWeights.open(tmp_path / f"expert{index}.safetensors") for index in range(len(experts))]
    return base, experts, SafetensorsWeights.open(tmp_path / "base.safetensors"), readers


def test_reader_gives_the_saved_tensors_and_answers_shapes_from_the_header(models):
    base, _, base_reader, _ = models
    assert sorted(base_reader) == sorted(base)
    for name, tensor in base.items():
        assert base_reader.shape(name) == tensor.shape
        assert base_reader.dtype(name) == tensor.dtype
        assert torch.equal(base_reader[name], tensor)
    assert base_reader.nbytes() == sum(t.numel() * t.element_size() for t in base.values())


MERGES = {
    "weight_averaging": lambda base, experts: weight_average(base, experts),
    "task_arithmetic": lambda base, experts: task_arithmetic_merge(base, experts, scaling=0.3),
    "ties_global": lambda base, experts: ties_merge(base, experts, k=20.0, trim_scope="global", merge="sum",
                                                    scaling=0.3),
    "ties_per_tensor": lambda base, experts: ties_merge(base, experts, k=30.0, trim_scope="per_tensor",
                                                        merge="mean", scaling=1.0),
    "dare_ta": lambda base, experts: dare_ta_merge(base, experts, p=0.5, rescale="l1", scaling=0.3, seed=3),
    "dare_ties": lambda base, experts: dare_ties_merge(base, experts, p=0.3, rescale="inverse_keep", k=20.0,
                                                       trim_scope="global", merge="sum", scaling=0.5, seed=1),
    "consensus_ta": lambda base, experts: consensus_merge(base, experts, k=2, tall_lambda=0.6, scaling=0.3),
    "tsv_m": lambda base, experts: tsv_merge(base, experts, alpha=1.0),
    "iso_c": lambda base, experts: iso_c_merge(base, experts, alpha=1.0),
}


@pytest.mark.parametrize("name", sorted(MERGES))
def test_merging_readers_equals_merging_state_dicts_bit_for_bit(models, name):
    base, experts, base_reader, readers = models
    in_memory = MERGES[name](base, experts)
    streamed = MERGES[name](base_reader, readers)
    assert sorted(streamed) == sorted(in_memory)
    for key, tensor in in_memory.items():
        assert torch.equal(streamed[key], tensor), key


def test_compatibility_is_checked_from_headers_without_reading_a_tensor(tmp_path, models, monkeypatch):
    base, experts, base_reader, _ = models
    bad = dict(experts[0])
    bad["b.weight"] = torch.zeros(33, 71)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    reader = SafetensorsWeights.open(tmp_path / "bad.safetensors")
    monkeypatch.setattr(SafetensorsWeights, "__getitem__", lambda self, key: pytest.fail(f"read {key}"))
    with pytest.raises(BenchError) as error:
        check_compatible(base_reader, [reader], ["cars"])
    assert str(error.value) == ("expert 'cars' tensor 'b.weight' has shape (33, 71), base has (33, 70); "
                                "experts must be fine-tuned from the same base")
    pool = ModelPool(base_reader, {"cars": reader})
    with pytest.raises(BenchError, match="expert 'cars' tensor 'b.weight'"):
        pool.check()


def test_sharded_checkpoint_reads_every_shard(tmp_path, models):
    base = models[0]
    names = sorted(base)
    save_file({k: base[k] for k in names[:2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: base[k] for k in names[2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if k in names[:2] else 2}-of-00002.safetensors" for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = SafetensorsWeights.open(tmp_path / "model.safetensors.index.json")
    assert sorted(reader) == names
    assert all(torch.equal(reader[k], base[k]) for k in names)


def test_index_without_weight_map_is_one_line(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(BenchError) as error:
        SafetensorsWeights.open(index, "expert 'cars'")
    assert str(error.value) == (f"expert 'cars': {index} has no 'weight_map' naming the shard of each tensor; "
                                "it is not a sharded safetensors index")


def test_truncated_file_is_one_line_naming_it(tmp_path, models):
    path = tmp_path / "expert0.safetensors"
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(BenchError) as error:
        SafetensorsWeights.open(truncated, "expert 'cars'")
    message = str(error.value)
    assert message.startswith("expert 'cars': tensor '") and "\n" not in message
    assert message.endswith("lies beyond the end of the file or has an unknown dtype; the file is truncated or "
                            "damaged: download or write it again")
    (tmp_path / "empty.safetensors").write_bytes(b"\x05")
    with pytest.raises(BenchError, match="is not a readable safetensors file"):
        SafetensorsWeights.open(tmp_path / "empty.safetensors", "expert 'cars'")


def test_mapped_weights_rename_cast_and_transpose_on_read(models):
    base, _, base_reader, _ = models
    view = MappedWeights(base_reader, {"x": "a.weight", "y": "a.bias"}, cast=torch.float64, transposed={"x"})
    assert view.shape("x") == (40, 70) and view.dtype("x") == torch.float64
    assert torch.equal(view["x"], base["a.weight"].T.double()) and view["x"].is_contiguous()
    in_memory = mapped(InMemoryWeights(base), {"x": "a.weight"}, transposed={"x"})
    assert isinstance(in_memory, dict) and torch.equal(in_memory["x"], base["a.weight"].T)
    assert isinstance(mapped(base_reader, {"x": "a.weight"}), MappedWeights)
    with pytest.raises(BenchError, match="tensor 'nope' is not in the checkpoint"):
        MappedWeights(base_reader, {"x": "nope"})


@pytest.mark.parametrize("row", ["task_arithmetic", "ties_global"])
def test_streamed_merge_peak_memory_does_not_grow_with_the_number_of_experts(tmp_path, row):
    """4 vs 16 experts of 64 MiB: the peak grows by K × (one tensor + per-row scratch), not by 12 models.

    Per expert, a streamed merge holds two tensor buffers (4 MiB each here: the key being merged and the one
    being read ahead); global TIES' exact top-k also keeps, per expert row, a 1 MiB sample and in-band values."""
    import bench_scale

    peaks = {}
    for experts in (4, 16):
        folder = tmp_path / f"k{experts}"
        bench_scale.write_models(folder, "small", experts)
        result = bench_scale.measure(folder, row, threads=1, cold=False)
        peaks[experts] = result["peak_rss"] - result["rss_before"]
    model, largest = 64 << 20, 4 << 20
    growth = peaks[16] - peaks[4]
    assert peaks[4] < model + 2 * 5 * largest + (64 << 20)  # the merged model, 2 buffers of 5 tensors, scratch
    assert growth < 12 * (2 * largest + (5 << 20)) + (16 << 20), (peaks, growth)  # holding them: +768 MiB


@pytest.mark.parametrize("family", ["gpt2-classifier", "t5", "llama"])
def test_transformers_checkpoint_reader_equals_loading_the_model(tmp_path, family):
    """The merged tensors read from a transformers checkpoint's safetensors, one at a time, equal what loading
    the whole model with transformers and extracting them gives (GPT-2's Conv1D weights transposed, T5's and
    Llama's names as saved)."""
    import fixtures_nlp
    from transformers import GPT2ForSequenceClassification, LlamaForCausalLM, T5ForConditionalGeneration

    from suites import _hub
    from suites._lm import MergedParameters, from_pretrained

    if family == "gpt2-classifier":
        fixtures_nlp.make_glue_gpt2(tmp_path, tasks=("sst2",))
        folder, model_class = _hub.model_dir(tmp_path, fixtures_nlp.GPT2_EXPERTS.format(task="sst2")), \
            GPT2ForSequenceClassification
    elif family == "t5":
        fixtures_nlp.make_glue_t5(tmp_path, tasks=("sst2",))
        folder, model_class = _hub.model_dir(tmp_path, fixtures_nlp.T5_EXPERTS.format(task="sst2")), \
            T5ForConditionalGeneration
    else:
        fixtures_nlp.make_llm(tmp_path, tmp_path / "tasks", domains=("alpha",))
        folder, model_class = _hub.model_dir(tmp_path, fixtures_nlp.LLM_EXPERTS.format(domain="alpha")), \
            LlamaForCausalLM
    model = from_pretrained(model_class, folder)
    if family == "gpt2-classifier":
        merged = MergedParameters(model.transformer, prefix="transformer.")
        expected = merged.extract(model.transformer)
        reader = merged.checkpoint_reader(folder, "expert", torch.float32, file_prefix="transformer.")
        assert len(merged.transposed) > 0
    else:
        merged = MergedParameters(model)
        expected = merged.extract()
        reader = merged.checkpoint_reader(folder, "expert", torch.float32)
    assert isinstance(reader, MappedWeights)
    assert list(reader) == list(expected)
    for key, tensor in expected.items():
        assert reader.shape(key) == tensor.shape
        assert torch.equal(reader[key], tensor), key
