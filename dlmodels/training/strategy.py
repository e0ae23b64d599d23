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

import tensorflow as tf

from dlmodels._validation import check_choice

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")


def num_workers_from_tf_config(tf_config: str | None = None) -> int:
    """Number of chief + worker tasks in `TF_CONFIG` (0 when unset or empty)."""
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw.strip():
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster' key: {raw!r}") from err
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


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


def _communication_options(timeout):
    if timeout is None:
        return tf.distribute.experimental.CommunicationOptions()
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(
            f"resolve_strategy: `communication_timeout`={timeout!r} must be a positive number of "
            "seconds (e.g. 60) or None."
        )
    return tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout))


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
) -> tf.distribute.Strategy:
    """Return a strategy by name.

    Args:
        name: one of
            - "auto": `TF_CONFIG` with more than one worker -> `MultiWorkerMirroredStrategy`;
              else more than one GPU -> `MirroredStrategy`; one GPU -> `OneDeviceStrategy`
              on it; else the default (no-op) strategy.
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

    Raises:
        ValueError: unknown name, arguments that do not apply, or no TPU for "tpu".
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

    if name == "auto":
        if num_workers_from_tf_config() > 1:
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
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=_communication_options(communication_timeout)
        )
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
