"""The repository layout the server reads, version policies and per-model config."""

from __future__ import annotations

import json
import shutil

import pytest

from serving.__main__ import parse_policy
from serving.metrics import Metrics
from serving.repository import ModelRepository, ServerSettings, check_policy, select_versions


def test_select_versions_and_policy_checks():
    assert select_versions({"latest": 2}, [1, 3, 2]) == [3, 2, 1]  # caller takes the first N
    assert select_versions({"all": True}, [2, 1]) == [2, 1]
    assert select_versions({"specific": [1, 3]}, [1, 2, 3]) == [3, 1]
    assert parse_policy("latest:2") == {"latest": 2}
    assert parse_policy("specific:1,3") == {"specific": [1, 3]}
    assert parse_policy("all") == {"all": True}
    for bad in ({"latest": 0}, {"all": False}, {"specific": []}, {"newest": 1}, [1]):
        with pytest.raises(ValueError, match="version_policy"):
            check_policy(bad, "cfg")
    with pytest.raises(ValueError, match="--version-policy 'newest:1'"):
        parse_policy("newest:1")


def test_layouts_names_and_config(repo, tmp_path):
    src = repo[0] / "classifier"
    root = tmp_path / "repo"
    shutil.copytree(src, root / "flat")  # NAME/manifest.json -> version 1
    for v in (1, 4):
        shutil.copytree(src, root / "numbered" / str(v))  # NAME/N/manifest.json
    shutil.copytree(src, root / "numbered" / "notes")  # not a number: ignored
    shutil.copytree(src, root / "bad name!")  # not a valid model name: never served
    (root / "numbered" / "config.json").write_text(
        json.dumps({"max_batch_size": 4, "version_policy": {"latest": 2}})
    )
    shutil.copytree(src, root / "broken")
    (root / "broken" / "config.json").write_text(json.dumps({"max_batch": 4}))
    repo_ = ModelRepository(root, ServerSettings(threads=1, warmup_runs=1), Metrics())
    found = repo_.scan()
    assert sorted(found) == ["broken", "flat", "numbered"]
    assert sorted(found["numbered"][1]) == [1, 4] and sorted(found["flat"][1]) == [1]
    assert repo_.poll() is True
    assert sorted(repo_.models["numbered"].versions) == [1, 4]
    served = repo_.get("numbered")
    assert served.version == 4 and served.max_batch_size == 4 and served.dynamic_batching
    assert repo_.get("flat", 1).max_batch_size == 32  # the server default
    assert "broken" not in repo_.models  # unknown config key: refused, logged
    assert "unknown keys ['max_batch']" in repo_.failed[("broken", 0)][1]
    assert repo_.poll() is False  # nothing changed: nothing reloaded
    shutil.rmtree(root / "flat")
    assert repo_.poll() is True and "flat" not in repo_.models
    repo_.executor.shutdown()


def test_a_version_replaced_by_a_corrupt_file_keeps_its_old_session(repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repo[0] / "gru", root / "gru" / "1")
    repo_ = ModelRepository(root, ServerSettings(threads=1, warmup_runs=1), Metrics())
    repo_.poll()
    before = repo_.get("gru", 1)
    (root / "gru" / "1" / "model.onnx").write_bytes(b"\x00garbage" * 64)
    assert repo_.poll() is False  # nothing new to serve
    assert repo_.get("gru", 1) is before  # the old session keeps answering
    sig, reason = repo_.failed[("gru", 1)]
    assert "model.onnx" in reason or "ONNX" in reason or "onnx" in reason
    assert repo_.poll() is False and repo_.failed[("gru", 1)][0] == sig  # not retried
    repo_.executor.shutdown()
