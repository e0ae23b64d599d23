"""resolve_strategy: names, defaults on this CPU-only machine, and clear errors."""

import json

import pytest
import tensorflow as tf

from dlmodels.training import is_chief, resolve_strategy
from dlmodels.training.strategy import num_workers_from_tf_config


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
