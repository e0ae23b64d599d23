"""Launchers without TensorFlow in the workers: TF_CONFIG generation, prefixed log streaming,
fail-fast, timeouts, the Kubeflow TFJob manifest and the `dlmodels launch` command line."""

import io
import json
import signal
import sys

import pytest

from dlmodels.training.launch import (
    LocalCluster,
    WorkerFailed,
    launch_local,
    main,
    tf_configs,
    tfjob_manifest,
    write_tfjob,
)
from tests.training import dist_worker

PY = sys.executable


def test_workers_get_consistent_tf_configs_and_prefixed_logs():
    stream = io.StringIO()
    code = "import os; print(os.environ['TF_CONFIG']); print('second line')"
    runs = launch_local(3, [PY, "-c", code], stream=stream, timeout=60)
    assert [r.returncode for r in runs] == [0, 0, 0]
    configs = [json.loads(r.log[0]) for r in runs]
    cluster = configs[0]["cluster"]
    assert [c["cluster"] for c in configs] == [cluster] * 3
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    ports = [int(a.rsplit(":", 1)[1]) for a in cluster["worker"]]
    assert len(set(ports)) == 3 and all(a.startswith("127.0.0.1:") for a in cluster["worker"])
    lines = stream.getvalue().splitlines()
    for i in range(3):
        assert f"[worker {i}] second line" in lines
        assert f"[worker {i}] {json.dumps(configs[i])}" in lines


def test_function_target_and_arguments():
    stream = io.StringIO()
    runs = launch_local(2, dist_worker.echo_tf_config, ["hello"], stream=stream, timeout=60)
    assert [r.log[0].split()[:2] for r in runs] == [["hello", "0"], ["hello", "1"]]
    with pytest.raises(ValueError, match="importable"):
        launch_local(2, lambda: None)


def test_a_failed_worker_stops_the_others_and_is_named():
    """Worker 1 fails at once; worker 0 would sleep 10 minutes and ignores SIGTERM (as
    TensorFlow's preemption handler does): it is SIGKILLed after the grace period."""
    code = (
        "import os, signal, sys, time\n"
        "if os.environ['TF_CONFIG'].endswith('\"index\": 1}}'):\n"
        "    print('boom: bad batch'); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True); time.sleep(600)\n"
    )
    cluster = LocalCluster(2, [PY, "-c", code], stream=False, grace_seconds=0.5).start()
    with pytest.raises(WorkerFailed, match=r"worker 1 exited with status 3") as failure:
        cluster.wait(timeout=120)
    assert failure.value.index == 1 and failure.value.returncode == 3
    assert "boom: bad batch" in str(failure.value)
    assert cluster.processes[0].returncode == -signal.SIGKILL


def test_timeout_stops_the_workers():
    cluster = LocalCluster(1, [PY, "-c", "import time; time.sleep(600)"], stream=False)
    cluster.start()
    with pytest.raises(TimeoutError, match=r"workers \[0\] still running"):
        cluster.wait(timeout=1)
    assert cluster.processes[0].returncode is not None


def test_tf_configs_use_given_ports():
    configs = [json.loads(c) for c in tf_configs(2, "10.0.0.5", ports=[2222, 2223])]
    assert configs[1] == {
        "cluster": {"worker": ["10.0.0.5:2222", "10.0.0.5:2223"]},
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(ValueError, match="num_workers"):
        tf_configs(0)


def test_tfjob_manifest_round_trips_through_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "job.yaml"
    manifest = write_tfjob(
        path,
        name="unet-train",
        image="registry.example/dlmodels:1.0",
        command="python -m train --epochs 90 --note 'a: b'",
        num_workers=4,
        namespace="ml",
        gpus_per_worker=2,
        env={"TF_CPP_MIN_LOG_LEVEL": "2"},
        memory="16Gi",
    )
    loaded = yaml.safe_load(path.read_text())
    assert loaded == manifest
    assert loaded["apiVersion"] == "kubeflow.org/v1" and loaded["kind"] == "TFJob"
    assert loaded["metadata"] == {"name": "unet-train", "namespace": "ml"}
    worker = loaded["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "OnFailure"
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "tensorflow"  # the name the training operator requires
    assert container["command"] == ["python", "-m", "train", "--epochs", "90", "--note", "a: b"]
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": 2},
        "requests": {"memory": "16Gi"},
    }
    assert container["env"] == [{"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"}]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "Unet_Train"}, "DNS-1123"),
        ({"num_workers": 0}, "num_workers"),
        ({"restart_policy": "Sometimes"}, "restart_policy"),
        ({"gpus_per_worker": -1}, "gpus_per_worker"),
        ({"command": []}, "command"),
    ],
)
def test_tfjob_manifest_errors(kwargs, fragment):
    args = {"name": "job", "image": "img", "command": ["python", "t.py"], "num_workers": 2}
    with pytest.raises(ValueError, match=fragment):
        tfjob_manifest(**{**args, **kwargs})


def test_command_line(tmp_path, capsys):
    assert main(["-n", "2", "--", PY, "-c", "print('hi')"]) == 0
    assert "[worker 1] hi" in capsys.readouterr().out
    assert main(["-n", "2", "--", PY, "-c", "import sys; sys.exit(5)"]) == 5
    assert "exited with status 5" in capsys.readouterr().err
    out = tmp_path / "job.yaml"
    assert main(["-n", "3", "--tfjob", str(out), "--image", "img:1", "--", "python", "t.py"]) == 0
    assert "replicas: 3" in out.read_text()
    with pytest.raises(SystemExit):
        main(["-n", "2"])  # no command
