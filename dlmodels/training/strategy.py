"""Pick a `tf.distribute.Strategy` from a name, `TF_CONFIG` and the visible devices.

`TF_CONFIG` is the scale-out contract: Kubeflow TFJob, Vertex AI, Ray Train's
`TensorflowTrainer` and SLURM launchers all set it, so "auto" turns a multi-worker `TF_CONFIG`
into `MultiWorkerMirroredStrategy` without code changes.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import subprocess
import sys

import tensorflow as tf

from dlmodels._validation import check_choice

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
COMMUNICATIONS = ("auto", "ring", "nccl")


def parse_tf_config(tf_config: str | None = None) -> dict:
    """`TF_CONFIG` (the environment's, or the given JSON) checked field by field.

    Returns {} when unset or empty. Raises a ValueError naming the bad field: not JSON,
    "cluster" missing or not a mapping of job name -> list of "host:port", a task type that
    is not a job of the cluster, a task index out of range.
    """
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw.strip():
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON ({err}): {raw!r}") from err
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(
            f"TF_CONFIG: field 'cluster' must be an object mapping job names to lists of "
            f'"host:port", e.g. {{"cluster": {{"worker": ["10.0.0.1:2222"]}}, "task": '
            f'{{"type": "worker", "index": 0}}}}; got {raw!r}.'
        )
    for job, addresses in config["cluster"].items():
        ok = isinstance(addresses, list) and all(
            isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses
        )
        if not ok:
            raise ValueError(
                f"TF_CONFIG: field 'cluster.{job}' must be a list of \"host:port\" strings, got "
                f"{addresses!r}."
            )
    task = config.get("task")
    if task is not None and not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG: field 'task' must be an object, got {task!r}.")
    if task:
        jobs = [j for j in config["cluster"] if j != "evaluator"]
        task_type = task.get("type")
        if task_type != "evaluator" and task_type not in jobs:
            raise ValueError(
                f"TF_CONFIG: field 'task.type'={task_type!r} is not a job of the cluster "
                f"({', '.join(repr(j) for j in config['cluster'])})."
            )
        index = task.get("index", 0)
        size = len(config["cluster"].get(task_type, []))
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < max(size, 1):
            raise ValueError(
                f"TF_CONFIG: field 'task.index'={index!r} must be an int in [0, {size}) for job "
                f"{task_type!r}."
            )
    return config


def num_workers_from_tf_config(tf_config: str | None = None) -> int:
    """Number of chief + worker tasks in `TF_CONFIG` (0 when unset or empty)."""
    cluster = parse_tf_config(tf_config).get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _multi_worker_strategy(options, connect_timeout):
    """`MultiWorkerMirroredStrategy`, with a watchdog on its start.

    Its constructor waits, without any timeout, until every task of the cluster has joined;
    a peer that never comes (a wrong address, a worker that crashed on start) hangs it inside
    TensorFlow, in C++ that holds the GIL, and TensorFlow catches SIGTERM. With
    `connect_timeout` a small watchdog process (standard library only) waits for the
    constructor to return; past the timeout it prints the peers that are not listening and
    SIGKILLs this process, so a launcher sees a failure with a reason instead of a hang.
    """
    if connect_timeout is None:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    read_fd, write_fd = os.pipe()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_connect_watchdog.py")
    watchdog = subprocess.Popen(
        [sys.executable, script, str(os.getpid()), str(connect_timeout), str(read_fd)],
        pass_fds=(read_fd,),
    )
    os.close(read_fd)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    finally:
        os.write(write_fd, b"1")
        os.close(write_fd)
        watchdog.wait()


_COLLECTIVE_KEY_BASES = itertools.count(1)


class _MirroredStrategy(tf.distribute.MirroredStrategy):
    """`MirroredStrategy` with collective keys of its own.

    Every `tf.distribute.MirroredStrategy` in a process starts its collective group and
    instance keys at the same numbers, and TensorFlow caches each (group, instance)'s shape: a
    second strategy over the same devices whose collectives differ in shape (another model,
    synchronised BatchNorm) aborts with "Shape mismatch in the collective instance". Tests and
    notebooks build several strategies in one process, so each one here gets its own key range.
    """

    def __init__(self, devices=None, cross_device_ops=None):
        self._collective_key_base = next(_COLLECTIVE_KEY_BASES) * 10_000
        super().__init__(devices, cross_device_ops)


def _check_seconds(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(
            f"resolve_strategy: `{name}`={value!r} must be a positive number of seconds (e.g. "
            "60) or None."
        )
    return float(value)


def _communication_options(timeout, communication="auto"):
    check_choice("communication", communication, COMMUNICATIONS, owner="resolve_strategy")
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[communication]
    timeout = _check_seconds("communication_timeout", timeout)
    return tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=timeout, implementation=implementation
    )


def tpu_available() -> bool:
    """Local evidence of a TPU: TPU devices, a TPU VM's accelerator files or environment, or a
    remote TPU named by `TPU_NAME` / `COLAB_TPU_ADDR`. Never probes the network."""
    return bool(
        glob.glob("/dev/accel*")
        or glob.glob("/dev/vfio/[0-9]*")
        or os.environ.get("TPU_ACCELERATOR_TYPE")
        or os.environ.get("TPU_NAME")
        or os.environ.get("COLAB_TPU_ADDR")
        or tf.config.list_physical_devices("TPU")
    )


def _tpu_strategy(tpu):
    """Connect to a TPU (Cloud TPU VM, Colab, GKE) and return a `TPUStrategy`."""
    # Decided from local evidence only: TPUClusterResolver without a name would otherwise probe
    # the GCE metadata server, which hangs or fails obscurely off Google Cloud.
    on_tpu_vm = bool(
        glob.glob("/dev/accel*")
        or glob.glob("/dev/vfio/[0-9]*")
        or os.environ.get("TPU_ACCELERATOR_TYPE")
        or tf.config.list_physical_devices("TPU")
    )
    remote = os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")
    if tpu is None and not (on_tpu_vm or remote):
        raise ValueError(
            "resolve_strategy('tpu'): no TPU found (no TPU devices on this machine, no TPU_NAME "
            "or COLAB_TPU_ADDR environment variable, no `tpu=` argument). Pass "
            "tpu='<name or grpc://address>' or run on a TPU VM; use 'auto' to fall back to "
            "GPU/CPU."
        )
    if tpu is None and on_tpu_vm and not remote:
        tpu = "local"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as err:
        raise ValueError(
            f"resolve_strategy('tpu'): could not connect to TPU {tpu!r}: {err}. Check the TPU name "
            "/ address and that this VM may reach it."
        ) from err
    return tf.distribute.TPUStrategy(resolver)


def resolve_strategy(
    name: str = "auto",
    *,
    devices=None,
    tpu: str | None = None,
    communication_timeout: float | None = None,
    communication: str = "auto",
    connect_timeout: float | None = None,
) -> tf.distribute.Strategy:
    """Return a strategy by name.

    Args:
        name: one of
            - "auto": a TPU (`tpu_available()`: TPU devices, a TPU VM, `TPU_NAME`) ->
              `TPUStrategy`; else `TF_CONFIG` with more than one worker ->
              `MultiWorkerMirroredStrategy`; else more than one GPU -> `MirroredStrategy`; one
              GPU -> `OneDeviceStrategy` on it; else the default (no-op) strategy.
            - "default": `tf.distribute.get_strategy()` outside any scope.
            - "one_device": `OneDeviceStrategy(devices[0])`, default the first GPU or the CPU.
            - "mirrored": `MirroredStrategy(devices)` (all GPUs, or the CPU, when None). Several
              logical CPUs (`["/cpu:0", "/cpu:1"]`) emulate replicas on one machine.
            - "multi_worker": `MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG`.
            - "tpu": `TPUStrategy` via `TPUClusterResolver(tpu)`; the TPU system is initialised.
        devices: device strings for "one_device" / "mirrored" only.
        tpu: TPU name or `grpc://` address for "tpu" (None: local TPU VM or `TPU_NAME`).
        communication_timeout: seconds before a multi-worker collective fails instead of
            hanging on a dead peer ("multi_worker" and "auto").
        communication: the multi-worker all-reduce: "auto", "ring" (gRPC, CPUs) or "nccl"
            (GPUs).
        connect_timeout: seconds the workers may take to all join the cluster ("multi_worker"
            and "auto"); past it a watchdog prints which peers are unreachable and kills this
            process (TensorFlow otherwise waits forever). Default: `communication_timeout`.

    Raises:
        ValueError: unknown name, arguments that do not apply, a malformed `TF_CONFIG` (the
            message names the field), or no TPU for "tpu".
    """
    check_choice("name", name, STRATEGIES, owner="resolve_strategy")
    if devices is not None:
        if name not in ("one_device", "mirrored"):
            raise ValueError(
                f"resolve_strategy: `devices`={devices!r} applies to 'one_device' and 'mirrored' "
                f"only, not {name!r}. Drop `devices` or pick one of those names."
            )
        if isinstance(devices, str):
            devices = [devices]
        devices = list(devices)
        if not devices:
            raise ValueError("resolve_strategy: `devices` is empty; pass e.g. ['/cpu:0'].")
    if tpu is not None and name != "tpu":
        raise ValueError(f"resolve_strategy: `tpu`={tpu!r} applies to name='tpu' only.")
    # Physical, not logical, devices: listing logical devices initialises the TF runtime, after
    # which MultiWorkerMirroredStrategy can no longer configure its collectives.
    gpus = tf.config.list_physical_devices("GPU")

    connect_timeout = _check_seconds("connect_timeout", connect_timeout)
    options = _communication_options(communication_timeout, communication)
    if connect_timeout is None and communication_timeout is not None:
        connect_timeout = float(communication_timeout)
    workers = num_workers_from_tf_config()  # validates TF_CONFIG whatever the name

    if name == "auto":
        if tpu_available():
            name = "tpu"
        elif workers > 1:
            name = "multi_worker"
        elif len(gpus) > 1:
            name = "mirrored"
        elif len(gpus) == 1:
            name = "one_device"
        else:
            name = "default"

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = devices[0] if devices else ("/gpu:0" if gpus else "/cpu:0")
        if devices and len(devices) != 1:
            raise ValueError(
                f"resolve_strategy('one_device'): `devices`={devices!r} must hold one device."
            )
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return _MirroredStrategy(devices)
    if name == "multi_worker":
        return _multi_worker_strategy(options, connect_timeout)
    return _tpu_strategy(tpu)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the task that owns shared outputs (checkpoints, logs).

    Single-worker strategies are always chief. With `TF_CONFIG`, the "chief" task is chief, or
    worker 0 when the cluster has no chief task.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief
