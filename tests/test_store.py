import json

import torch

from bench.store import ResultsStore, config_hash, pack_correct, unpack_correct, write_json_atomic


def test_config_hash_is_stable_and_order_insensitive():
    a = {"suite": "toy", "method": "ties", "params": {"k": 20.0, "scaling": 0.3}, "seed": 0, "suite_params": {}}
    b = {"seed": 0, "params": {"scaling": 0.3, "k": 20.0}, "method": "ties", "suite_params": {}, "suite": "toy"}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "seed": 1})
    assert config_hash(a) == "c6b14089c7e09bd2"  # fixed across machines and sessions


def test_correctness_bits_roundtrip():
    correct = torch.tensor([True, False, True, True, False, False, True, False, True, True, True])
    packed = pack_correct(correct)
    assert unpack_correct(packed, 11).tolist() == correct.tolist()
    assert len(packed) <= 4  # 11 bits -> 2 bytes -> 4 base64 chars


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a" / "r.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_corrupt_record_is_skipped_with_warning(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    bad = tmp_path / "toy" / "ties" / "0123456789abcdef.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": 1, "trunc')
    assert list(store.records()) == []
    err = capsys.readouterr().err
    assert err.startswith(f"bench: warning: ignoring unreadable record {bad}")
    assert err.strip().endswith("it is skipped; rerun its configuration with --resume to recompute it")
