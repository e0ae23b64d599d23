"""Launchers: local worker processes, a Kubeflow TFJob manifest and Ray Train.

The scale-out contract is `TF_CONFIG` (`resolve_strategy("auto")` reads it), so the same
training script runs under every launcher here:

- `launch_local(n, ...)` starts n worker processes on this machine, each with a generated
  `TF_CONFIG` on free localhost ports, streams their output prefixed by `[worker i]`, and
  fails fast: when one worker fails the others are stopped and `WorkerFailed` names it.
- `tfjob_manifest(...)` / `write_tfjob(...)` describe the same job for Kubeflow's training
  operator, which sets `TF_CONFIG` in every pod.
- `ray_train(fn, n)` runs a training function on n Ray workers with
  `ray.train.tensorflow.TensorflowTrainer`, which sets `TF_CONFIG` too (optional `[ray]`
  extra).

`main(argv)` is the `dlmodels launch` command line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from dlmodels._validation import check_positive_int
from dlmodels.errors import OneLineArgumentParser, UserError


class WorkerFailed(RuntimeError):
    """A worker process exited with an error (or was killed); the others were stopped.

    Attributes:
        index: the failed worker's index in the cluster.
        returncode: its exit status (negative: killed by that signal).
        log_tail: its last lines of output.
    """

    def __init__(self, index, returncode, log_tail):
        self.index, self.returncode, self.log_tail = index, returncode, log_tail
        if returncode is not None and returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with status {returncode}"
        tail = "\n".join(log_tail[-20:])
        super().__init__(
            f"worker {index} {how}; the other workers were stopped. Its last output:\n{tail}"
        )


@dataclasses.dataclass
class WorkerRun:
    """One finished worker: its index, exit status and full output (lines)."""

    index: int
    returncode: int
    log: list


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on `host` (bound at once, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(num_workers: int, host: str = "127.0.0.1", ports=None) -> list[str]:
    """The `TF_CONFIG` JSON of each of `num_workers` workers on `host` (worker 0 is chief)."""
    num_workers = check_positive_int("num_workers", num_workers, owner="tf_configs")
    ports = list(ports) if ports is not None else free_ports(num_workers, host)
    if len(ports) != num_workers:
        raise UserError(f"tf_configs: {len(ports)} ports for {num_workers} workers.")
    cluster = {"worker": [f"{host}:{p}" for p in ports]}
    return [
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(num_workers)
    ]


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise UserError(
            f"launch_local: the function {target!r} must be importable by the workers (defined "
            "at the top level of a module other than __main__); or pass 'module:function'."
        )
    return f"{module}:{name}"


def _command(target, args):
    """argv of one worker: a command list / string as is; a function as 'module:function'."""
    if isinstance(target, list | tuple):
        return [str(a) for a in target] + [str(a) for a in args]
    if isinstance(target, str) and ":" not in target:
        return shlex.split(target) + [str(a) for a in args]
    name = _target_name(target)
    return [sys.executable, "-c", _RUN_TARGET, name, json.dumps([str(a) for a in args])]


# The worker's entry point for a function target; standard library only, so a worker imports
# nothing (TensorFlow included) before its own function does.
_RUN_TARGET = """
import importlib, json, sys
module, _, attr = sys.argv[1].partition(":")
fn = importlib.import_module(module)
for part in attr.split("."):
    fn = getattr(fn, part)
fn(*json.loads(sys.argv[2]))
"""


class LocalCluster:
    """N worker processes on this machine, each with its own `TF_CONFIG` (see `launch_local`).

    `start()` starts them; `wait()` streams, waits and fails fast; `processes` lets a caller
    (a test of fault tolerance) signal one worker.
    """

    def __init__(
        self,
        num_workers,
        target,
        args=(),
        *,
        env=None,
        cwd=None,
        host="127.0.0.1",
        stream=None,
        prefix=True,
        grace_seconds=5.0,
    ):
        self.num_workers = check_positive_int("num_workers", num_workers, owner="launch_local")
        self.command = _command(target, args)
        self.env, self.cwd, self.host = env, cwd, host
        self.stream = sys.stdout if stream is None else stream
        self.prefix = prefix
        self.grace_seconds = float(grace_seconds)
        self.configs = []
        self.processes = []
        self.logs = []
        self._threads = []
        self._lock = threading.Lock()

    def start(self):
        self.configs = tf_configs(self.num_workers, self.host)
        base = {**os.environ, **(self.env or {})}
        # The workers import the caller's modules: keep its import path.
        base["PYTHONPATH"] = os.pathsep.join(
            p for p in [os.getcwd(), base.get("PYTHONPATH", "")] if p
        )
        base.setdefault("PYTHONUNBUFFERED", "1")
        for index, config in enumerate(self.configs):
            proc = subprocess.Popen(
                self.command,
                env={**base, "TF_CONFIG": config},
                cwd=self.cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            self.processes.append(proc)
            self.logs.append(collections.deque(maxlen=100_000))
            thread = threading.Thread(target=self._pump, args=(index, proc), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _pump(self, index, proc):
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.logs[index].append(line)
            if self.stream is not False:
                with self._lock:
                    shown = f"[worker {index}] {line}" if self.prefix else line
                    print(shown, file=self.stream, flush=True)

    def stop(self):
        """Stop every worker still running: SIGTERM, then SIGKILL after `grace_seconds`."""
        alive = [p for p in self.processes if p.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait(self, timeout=None) -> list[WorkerRun]:
        """Wait for every worker. The first failure stops the rest and raises `WorkerFailed`;
        past `timeout` seconds all are stopped and `TimeoutError` is raised."""
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        try:
            while True:
                codes = [p.poll() for p in self.processes]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    index = failed[0]
                    self.stop()
                    self._join()
                    raise WorkerFailed(index, codes[index], list(self.logs[index]))
                if all(c == 0 for c in codes):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    running = [i for i, c in enumerate(codes) if c is None]
                    self.stop()
                    self._join()
                    raise TimeoutError(
                        f"launch_local: workers {running} still running after {timeout} s; all "
                        "were stopped. A worker waiting for an unreachable peer hangs until its "
                        "collective timeout (resolve_strategy(communication_timeout=...))."
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self._join()
        return [
            WorkerRun(i, p.returncode, list(self.logs[i])) for i, p in enumerate(self.processes)
        ]

    def _join(self):
        for thread in self._threads:
            thread.join(timeout=5)


def launch_local(
    num_workers,
    target,
    args=(),
    *,
    env=None,
    cwd=None,
    timeout=None,
    stream=None,
    prefix=True,
) -> list[WorkerRun]:
    """Run `num_workers` local worker processes of one multi-worker job and wait for them.

    Each worker gets `TF_CONFIG` = {"cluster": {"worker": [127.0.0.1:<free port>, ...]},
    "task": {"type": "worker", "index": i}}, so `resolve_strategy("auto")` builds a
    `MultiWorkerMirroredStrategy` and worker 0 is the chief. Output is streamed line by line
    with a `[worker i]` prefix. When a worker fails, the others are stopped (SIGTERM, then
    SIGKILL) and `WorkerFailed` says which one and shows its last lines.

    Args:
        num_workers: number of processes.
        target: the command (argv list, or a shell-like string) or a function, given as an
            importable top-level function or "module:function"; the workers call it with
            `args` (as strings).
        args: extra arguments appended to the command / passed to the function.
        env: extra environment variables for every worker.
        cwd: working directory of the workers.
        timeout: seconds before all workers are stopped and `TimeoutError` is raised.
        stream: where the prefixed lines go (default stdout; False: keep them only).
        prefix: prefix each line with "[worker i] ".

    Returns:
        One `WorkerRun` per worker (index, return code 0, output lines).

    Raises:
        WorkerFailed: a worker exited with a non-zero status or was killed.
        TimeoutError: `timeout` passed.
    """
    cluster = LocalCluster(
        num_workers, target, args, env=env, cwd=cwd, stream=stream, prefix=prefix
    ).start()
    return cluster.wait(timeout=timeout)


# -- Kubeflow ---------------------------------------------------------------------------------
def tfjob_manifest(
    name,
    image,
    command,
    num_workers,
    *,
    namespace=None,
    gpus_per_worker=0,
    restart_policy="OnFailure",
    env=None,
    cpu=None,
    memory=None,
) -> dict:
    """A Kubeflow training-operator `TFJob` (kubeflow.org/v1) running `command` in `image` on
    `num_workers` workers; the operator sets `TF_CONFIG` in every pod (worker 0 is chief).

    Args:
        name: the job's name (a DNS-1123 label: lower case letters, digits, '-').
        image: the container image holding dlmodels and the training script.
        command: the command, a list or a shell-like string.
        num_workers: worker replicas.
        namespace: Kubernetes namespace (None: the current one).
        gpus_per_worker: `nvidia.com/gpu` limit per worker (0: none).
        restart_policy: "OnFailure", "Always", "ExitCode" or "Never"; with "OnFailure" a
            failed worker is restarted and the job resumes from its checkpoint directory.
        env: extra environment variables (dict).
        cpu, memory: resource requests (e.g. "4", "16Gi").

    Returns:
        The manifest as a dict (`write_tfjob` writes it as YAML).
    """
    owner = "tfjob_manifest"
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise UserError(
            f"{owner}: `name`={name!r} must be a DNS-1123 label (lower case letters, digits and "
            "'-', starting and ending with a letter or digit, at most 63), e.g. 'unet-train'."
        )
    if not isinstance(image, str) or not image:
        raise UserError(f"{owner}: `image`={image!r} must name a container image.")
    num_workers = check_positive_int("num_workers", num_workers, owner=owner)
    policies = ("OnFailure", "Always", "ExitCode", "Never")
    if restart_policy not in policies:
        raise UserError(
            f"{owner}: `restart_policy`={restart_policy!r} is not supported. Allowed values: "
            f"{', '.join(repr(p) for p in policies)}."
        )
    if (
        isinstance(gpus_per_worker, bool)
        or not isinstance(gpus_per_worker, int)
        or (gpus_per_worker < 0)
    ):
        raise UserError(f"{owner}: `gpus_per_worker`={gpus_per_worker!r} must be an int >= 0.")
    argv = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    if not argv:
        raise UserError(f"{owner}: `command` is empty.")
    container = {"name": "tensorflow", "image": image, "command": argv}  # the operator's name
    if env:
        container["env"] = [{"name": str(k), "value": str(v)} for k, v in env.items()]
    resources = {}
    if gpus_per_worker:
        resources["limits"] = {"nvidia.com/gpu": gpus_per_worker}
    requests = {k: str(v) for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    if requests:
        resources["requests"] = requests
    if resources:
        container["resources"] = resources
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": metadata,
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None"},
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": num_workers,
                    "restartPolicy": restart_policy,
                    "template": {"spec": {"containers": [container]}},
                }
            },
        },
    }


def _yaml(value, indent=0) -> str:
    """A small block-style YAML emitter for manifests (dicts, lists, str, int, bool); strings
    are JSON-quoted, which YAML reads back verbatim."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_yaml(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        lines = []
        for item in value:
            if isinstance(item, dict) and item:
                body = _yaml(item, indent + 2)
                lines.append(f"{pad}- {body[indent + 2 :]}")
            else:
                lines.append(f"{pad}- {_yaml(item)}")
        return "\n".join(lines)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value))


def write_tfjob(path, **kwargs) -> dict:
    """Write `tfjob_manifest(**kwargs)` as YAML to `path` (for `kubectl apply -f`); returns it."""
    manifest = tfjob_manifest(**kwargs)
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(_yaml(manifest) + "\n")
    return manifest


# -- Ray Train --------------------------------------------------------------------------------
def ray_train(
    train_fn,
    num_workers,
    *,
    config=None,
    use_gpu=False,
    storage_path=None,
    name=None,
    num_cpus=None,
):
    """Run `train_fn(config)` on `num_workers` Ray workers under
    `ray.train.tensorflow.TensorflowTrainer`, which sets `TF_CONFIG` in every worker (use
    `resolve_strategy("auto")` inside). Starts a local Ray instance when none is running.

    Args:
        train_fn: the per-worker training function, taking the `config` dict.
        num_workers: Ray workers.
        config: the dict passed to `train_fn`.
        use_gpu: one GPU per worker.
        storage_path: where Ray Train keeps run state (a local directory or cloud URI).
        name: the run's name.
        num_cpus: CPUs for a local Ray instance started here.

    Returns:
        Ray's `Result` (`.metrics` holds the last `ray.train.report`).
    """
    num_workers = check_positive_int("num_workers", num_workers, owner="ray_train")
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer
    except ImportError as err:
        raise ImportError(
            "ray_train needs Ray Train: pip install 'dlmodels[ray]' (ray[train])."
        ) from err
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    trainer = TensorflowTrainer(
        train_fn,
        train_loop_config=config or {},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=bool(use_gpu)),
        run_config=RunConfig(
            storage_path=None if storage_path is None else os.path.abspath(storage_path),
            name=name,
        ),
    )
    return trainer.fit()


# -- command line -----------------------------------------------------------------------------
def main(argv=None) -> int:
    """`dlmodels launch`: run a training command on N local workers, or write a TFJob.

        dlmodels launch -n 2 -- python train.py --epochs 3
        dlmodels launch -n 8 --tfjob job.yaml --image registry/dlmodels:1 --gpus 1 \\
            -- python train.py --epochs 90

    Returns the exit status (0 on success; the failed worker's status otherwise).
    """
    parser = OneLineArgumentParser(
        prog="dlmodels launch",
        description="Run a training command on N workers with a generated TF_CONFIG.",
    )
    parser.add_argument("-n", "--num-workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping")
    parser.add_argument("--tfjob", metavar="PATH", help="write a Kubeflow TFJob instead")
    parser.add_argument("--name", default="dlmodels-train", help="TFJob name")
    parser.add_argument("--image", help="TFJob container image")
    parser.add_argument("--namespace")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per TFJob worker")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    ns = parser.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("give the command after --, e.g. dlmodels launch -n 2 -- python train.py")
    if ns.tfjob:
        if not ns.image:
            parser.error("--tfjob needs --image")
        write_tfjob(
            ns.tfjob,
            name=ns.name,
            image=ns.image,
            command=command,
            num_workers=ns.num_workers,
            namespace=ns.namespace,
            gpus_per_worker=ns.gpus,
        )
        print(f"wrote {ns.tfjob}: kubectl apply -f {ns.tfjob}")
        return 0
    try:
        launch_local(ns.num_workers, command, timeout=ns.timeout)
    except WorkerFailed as err:
        print(f"dlmodels launch: {err}", file=sys.stderr)
        return err.returncode if err.returncode and err.returncode > 0 else 1
    except TimeoutError as err:
        print(f"dlmodels launch: {err}", file=sys.stderr)
        return 124
    return 0


if __name__ == "__main__":
    sys.exit(main())
