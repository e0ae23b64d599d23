"""resolve_strategy: names, defaults on this CPU-only machine, and clear errors."""

import json

import pytest
import tensorflow as tf

from dlmodels.training import is_chief, resolve_strategy
from dlmodels.training.strategy import (
    _communication_options,
    num_workers_from_tf_config,
    parse_tf_config,
    tpu_available,
)


def test_names_resolve_on_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    default = resolve_strategy("default")
    assert default is tf.distribute.get_strategy()
    assert resolve_strategy("auto") is default  # no GPU, no TF_CONFIG
    one = resolve_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    mirrored = resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2
    assert is_chief(mirrored) and is_chief(default)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="'auto', 'default', 'one_device', 'mirrored'"):
        resolve_strategy("horovod")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "default", "devices": ["/cpu:0"]}, "devices"),
        ({"name": "mirrored", "devices": []}, "empty"),
        ({"name": "one_device", "devices": ["/cpu:0", "/cpu:1"]}, "one device"),
        ({"name": "mirrored", "tpu": "x"}, "tpu"),
        ({"name": "multi_worker", "communication_timeout": -1}, "communication_timeout"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve_strategy(**kwargs)


def test_tpu_errors_clearly_without_a_tpu(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(ValueError, match="no TPU found"):
        resolve_strategy("tpu")


def test_tf_config_worker_count():
    assert num_workers_from_tf_config("") == 0
    cluster = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {}}
    assert num_workers_from_tf_config(json.dumps(cluster)) == 3
    with pytest.raises(ValueError, match="TF_CONFIG"):
        num_workers_from_tf_config("{not json")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("{not json", "not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "field 'cluster'"),
        ('{"cluster": {"worker": "a:1"}}', "field 'cluster.worker'"),
        ('{"cluster": {"worker": ["a"]}}', "field 'cluster.worker'"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "task.type"),
        (
            '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
            "task.index",
        ),
        ('{"cluster": {"worker": ["a:1"]}, "task": "worker"}', "field 'task'"),
    ],
)
def test_malformed_tf_config_names_the_field(monkeypatch, raw, field):
    with pytest.raises(ValueError, match=field):
        parse_tf_config(raw)
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ValueError, match=field):
        resolve_strategy("auto")


def test_communication_options(monkeypatch):
    options = _communication_options(30, "ring")
    assert options.timeout_seconds == 30.0
    assert options.implementation == tf.distribute.experimental.CommunicationImplementation.RING
    with pytest.raises(ValueError, match="communication"):
        resolve_strategy("multi_worker", communication="mpi")
    with pytest.raises(ValueError, match="connect_timeout"):
        resolve_strategy("multi_worker", connect_timeout=0)


def test_auto_picks_the_tpu_when_one_is_evident(monkeypatch):
    """A TPU VM's environment makes "auto" try TPUStrategy (here it fails clearly: no TPU)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert not tpu_available()
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
    assert tpu_available()
    with pytest.raises(ValueError, match="could not connect to TPU 'local'"):
        resolve_strategy("auto")
