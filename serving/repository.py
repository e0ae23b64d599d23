"""The model repository the server reads, its version policy and hot reload.

Layout (what `dlmodels.export.write_repository(model, "repo/NAME", ...)` writes is version 1):

    repo/NAME/manifest.json            one version, served as version 1
    repo/NAME/N/manifest.json          numbered versions (N = 1, 2, ...): TF Serving / Triton
                                       style; when these exist the top-level manifest is ignored
    repo/NAME/config.json              optional per-model settings:
        {"format": "onnx" | "int8" | ...,         which artifact of each manifest to serve
         "max_batch_size": 32, "max_queue_delay_ms": 2.0, "dynamic_batching": true,
         "version_policy": {"latest": 1} | {"all": true} | {"specific": [1, 3]}}
    repo/manifest.json                 a repository that is one model (named by its manifest)

`ModelRepository.poll()` scans the directory, loads what is new or changed (each version is
loaded, warmed up and only then published), retires versions the policy no longer wants and
keeps serving the old version when a new one fails to load (the error is logged and counted;
the failed files are retried only when they change). Publish a new version by writing it to a
temporary directory and renaming it to `repo/NAME/N`: the manifest is what marks it complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from dlmodels.runtime import MANIFEST_FILENAME, Manifest, OnnxModel, load_manifest
from serving._common import ServingError, dtype_of, log, valid_name
from serving.batcher import Activity, DynamicBatcher
from serving.metrics import Metrics

CONFIG_FILENAME = "config.json"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Settings every model gets unless its config.json says otherwise.

    Attributes:
        format: artifact format to serve ("onnx", "int8", ...).
        threads: onnxruntime intra-op threads per session (None: the CPUs this process may use).
        providers: onnxruntime execution providers (e.g. ["OpenVINOExecutionProvider",
            "CPUExecutionProvider"] where onnxruntime-openvino is installed).
        spinning: let onnxruntime's worker threads spin between runs (off: on a small machine
            spinning threads take the CPU the HTTP side needs).
        dynamic_batching / max_batch_size / max_queue_delay_ms: the batcher's defaults.
        version_policy: {"latest": N} | {"all": True} | {"specific": [...]}.
        warmup_runs: inferences on zeros before a version is published.
        inline_below_ms: models whose batch-1 inference (timed after warm-up) takes less run
            on the event loop itself: for them a hand-off to a worker thread costs more than
            the inference (0: always use worker threads).
        instances: concurrent onnxruntime runs per model version without dynamic batching
            (Triton's instance count): more than one oversubscribes a small CPU, since every
            run already uses `threads` threads.
    """

    format: str = "onnx"
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    spinning: bool = False
    dynamic_batching: bool = True
    max_batch_size: int = 32
    max_queue_delay_ms: float = 1.0
    version_policy: dict = dataclasses.field(default_factory=lambda: {"latest": 1})
    warmup_runs: int = 2
    inline_below_ms: float = 0.5
    instances: int = 1


def check_policy(policy: Any, where: str) -> dict:
    ok = isinstance(policy, dict) and len(policy) == 1
    if ok and "latest" in policy:
        n = policy["latest"]
        ok = isinstance(n, int) and not isinstance(n, bool) and n >= 1
    elif ok and "all" in policy:
        ok = policy["all"] is True
    elif ok and "specific" in policy:
        v = policy["specific"]
        ok = isinstance(v, list) and bool(v) and all(isinstance(i, int) and i >= 1 for i in v)
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"{where}: version_policy {policy!r} is not valid; use {{'latest': N}} (N >= 1), "
            "{'all': true} or {'specific': [1, 3]}"
        )
    return policy


def select_versions(policy: dict, available: list[int]) -> list[int]:
    """The versions a policy wants, newest first, from those available."""
    ordered = sorted(available, reverse=True)
    if "all" in policy:
        return ordered
    if "specific" in policy:
        return [v for v in ordered if v in set(policy["specific"])]
    return ordered  # "latest": the caller takes the first N that load


class ServedVersion:
    """One loaded version of a model: its onnxruntime session, specs and batcher."""

    def __init__(
        self,
        name: str,
        version: int,
        manifest: Manifest,
        model: OnnxModel,
        *,
        settings: dict,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
        signature: tuple,
        activity: Activity | None = None,
        inline: bool = False,
    ):
        self.name = name
        self.version = version
        self.manifest = manifest
        self.model = model
        self.signature = signature
        self.inputs = model.inputs
        self.outputs = model.outputs
        self.input_dtypes = {s.name: dtype_of(s.dtype) for s in self.inputs}
        self.output_names = list(model.output_names)
        self.loaded_at = time.time()
        # Batchable: every input and output has a free first axis (the batch axis).
        self.batchable = all(
            s.rank >= 1 and not isinstance(s.shape[0], int) for s in (*self.inputs, *self.outputs)
        )
        self.max_batch_size = int(settings["max_batch_size"]) if self.batchable else 0
        self.dynamic_batching = bool(settings["dynamic_batching"]) and self.batchable
        self.max_queue_delay_ms = float(settings["max_queue_delay_ms"])
        self._executor = executor
        self._metrics = metrics
        self._session = model.session
        self.inline = inline
        self.instances = max(int(settings.get("instances", 1)), 1)
        self._slots: asyncio.Semaphore | None = None
        self._activity = activity or Activity()
        self.batcher = None
        if self.dynamic_batching:
            label = name

            def on_batch(rows, requests, waits, infer):
                metrics.batch_size.labels(label).observe(rows)
                metrics.batch_requests.labels(label).observe(requests)
                q = metrics.stage.labels(label, "queue")
                for w in waits:
                    q.observe(w)
                inf = metrics.stage.labels(label, "infer")
                for _ in waits:
                    inf.observe(infer)

            self.batcher = DynamicBatcher(
                self._run,
                executor,
                max_batch_size=self.max_batch_size,
                max_queue_delay=self.max_queue_delay_ms / 1e3,
                activity=self._activity,
                inline=inline,
                on_batch=on_batch,
                on_depth=metrics.queue_depth.labels(label).set,
            )

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self.output_names, feeds)

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one validated request (through the batcher when batching is on).

        Raises:
            ServingError(400): onnxruntime refused the values (e.g. a class id outside an
                embedding's range): the request is wrong, not the server.
        """
        try:
            return await self._infer(feeds)
        except (InvalidArgument, Fail) as err:
            message = str(err).split("Status Message:", 1)[-1].strip()
            raise ServingError(
                400, f"model {self.name!r} rejected the input values: {message[:500]}"
            ) from None

    async def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(feeds.values())).shape[0] if self.batchable and feeds else 1
        activity = self._activity
        if self.batcher is not None:
            activity.waiting += 1
            try:
                outputs = await self.batcher.submit(feeds, rows)
            finally:
                activity.waiting -= 1
        else:
            start = time.perf_counter()
            if self.inline:
                outputs = self._run(feeds)
            else:
                if self._slots is None:
                    self._slots = asyncio.Semaphore(self.instances)
                loop = asyncio.get_running_loop()
                async with self._slots:
                    outputs = await loop.run_in_executor(self._executor, self._run, feeds)
            self._metrics.stage.labels(self.name, "infer").observe(time.perf_counter() - start)
            self._metrics.batch_size.labels(self.name).observe(rows)
            self._metrics.batch_requests.labels(self.name).observe(1)
        return dict(zip(self.output_names, outputs, strict=True))

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()


def _signature(version_dir: Path) -> tuple:
    """What identifies a version's files: name, size and mtime of each file in its directory."""
    out = []
    for p in sorted(version_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclasses.dataclass
class ModelEntry:
    """A model's loaded versions (an immutable snapshot is swapped in on every change)."""

    name: str
    versions: dict[int, ServedVersion]
    config: dict

    @property
    def latest(self) -> ServedVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


class ModelRepository:
    """Every model and version of a repository directory, loaded into onnxruntime sessions.

    Thread-safety: `poll()` runs in a worker thread (file I/O, session creation, warm-up) and
    publishes each model as a new `ModelEntry` object in one assignment; request handlers read
    `self.models` without locks. Versions that leave the policy are closed on the event loop
    after their queued requests finish.
    """

    def __init__(self, root: str | os.PathLike, settings: ServerSettings, metrics: Metrics):
        self.root = Path(root)
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelEntry] = {}
        self.activity = Activity()
        self.failed: dict[tuple[str, int], tuple[tuple, str]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        workers = max(4, 4 * (os.cpu_count() or 1))
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        self.polls = 0

    # -- discovery --------------------------------------------------------------------------

    def scan(self) -> dict[str, tuple[Path, dict[int, Path]]]:
        """name -> (model dir, {version: version dir holding a manifest})."""
        found: dict[str, tuple[Path, dict[int, Path]]] = {}
        if (self.root / MANIFEST_FILENAME).is_file():
            try:
                name = load_manifest(self.root / MANIFEST_FILENAME, check_files=False).name
            except Exception:
                name = self.root.name
            if valid_name(name):
                found[name] = (self.root, {1: self.root})
        try:
            children = sorted(p for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return found
        for model_dir in children:
            name = model_dir.name
            if not valid_name(name):
                continue
            versions = {
                int(v.name): v
                for v in model_dir.iterdir()
                if v.is_dir() and v.name.isdigit() and (v / MANIFEST_FILENAME).is_file()
            }
            if not versions and (model_dir / MANIFEST_FILENAME).is_file():
                versions = {1: model_dir}
            if versions:
                found[name] = (model_dir, versions)
        return found

    def model_config(self, name: str, model_dir: Path) -> dict:
        s = self.settings
        config = {
            "format": s.format,
            "dynamic_batching": s.dynamic_batching,
            "max_batch_size": s.max_batch_size,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "version_policy": s.version_policy,
            "instances": s.instances,
        }
        path = model_dir / CONFIG_FILENAME
        if path.is_file() and model_dir != self.root:
            data = json.loads(path.read_text())
            unknown = set(data) - set(config)
            if unknown:
                raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {list(config)}")
            config.update(data)
            check_policy(config["version_policy"], str(path))
            if not isinstance(config["max_batch_size"], int) or config["max_batch_size"] < 1:
                raise ValueError(f"{path}: max_batch_size must be an int >= 1")
        return config

    # -- loading ----------------------------------------------------------------------------

    def load_version(self, name: str, version: int, vdir: Path, config: dict) -> ServedVersion:
        manifest = load_manifest(vdir / MANIFEST_FILENAME)
        session_config = {} if self.settings.spinning else {"session.intra_op.allow_spinning": "0"}
        start = time.perf_counter()
        model = OnnxModel.from_manifest(
            manifest,
            config["format"],
            threads=self.settings.threads,
            providers=self.settings.providers,
            session_config=session_config,
        )
        loaded = time.perf_counter()
        model.warmup(runs=self.settings.warmup_runs)
        warmed = time.perf_counter()
        feeds = model.example_inputs(1)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model.session.run(None, feeds)
            times.append(time.perf_counter() - t)
        batch1_ms = 1e3 * sorted(times)[1]
        served = ServedVersion(
            name,
            version,
            manifest,
            model,
            settings=config,
            executor=self.executor,
            metrics=self.metrics,
            signature=_signature(vdir),
            activity=self.activity,
            inline=batch1_ms < self.settings.inline_below_ms,
        )
        log(
            logging.INFO,
            "model_loaded",
            model=name,
            version=version,
            path=str(model.path),
            format=config["format"],
            load_ms=round(1e3 * (loaded - start), 1),
            warmup_ms=round(1e3 * (warmed - loaded), 1),
            batch1_ms=round(batch1_ms, 3),
            inline=served.inline,
            dynamic_batching=served.dynamic_batching,
            max_batch_size=served.max_batch_size,
            threads=model.threads,
            providers=model.providers,
        )
        return served

    def poll(self) -> bool:
        """Scan once and apply changes; returns whether anything changed. Never raises for a
        bad model: its error is logged and the versions already serving stay."""
        changed = False
        found = self.scan()
        for name, (model_dir, versions) in found.items():
            try:
                config = self.model_config(name, model_dir)
            except Exception as err:
                key = (name, 0)
                sig = _signature(model_dir)
                if self.failed.get(key, (None,))[0] != sig:
                    self.failed[key] = (sig, str(err))
                    self.metrics.load_failures.labels(name).inc()
                    log(logging.ERROR, "model_config_invalid", model=name, error=str(err))
                continue
            self.failed.pop((name, 0), None)
            changed |= self._sync_model(name, versions, config)
        for name in [n for n in self.models if n not in found]:
            entry = self.models.pop(name)
            for v in entry.versions.values():
                self._retire(v)
            self.metrics.loaded.labels(name).set(0)
            log(logging.INFO, "model_removed", model=name)
            changed = True
        self.polls += 1
        return changed

    def _sync_model(self, name: str, versions: dict[int, Path], config: dict) -> bool:
        entry = self.models.get(name)
        current = dict(entry.versions) if entry else {}
        policy = config["version_policy"]
        want_n = policy.get("latest") if "latest" in policy else None
        keep: dict[int, ServedVersion] = {}
        for version in select_versions(policy, list(versions)):
            if want_n is not None and len(keep) >= want_n:
                break
            vdir = versions[version]
            try:
                sig = _signature(vdir)
            except OSError:
                continue
            served = current.get(version)
            if served is not None and served.signature == sig:
                keep[version] = served
                continue
            failure = self.failed.get((name, version))
            if failure is not None and failure[0] == sig:
                if served is not None:  # changed files that failed: keep the old session
                    keep[version] = served
                continue
            try:
                keep[version] = self.load_version(name, version, vdir, config)
                self.failed.pop((name, version), None)
            except Exception as err:
                self.failed[(name, version)] = (sig, f"{type(err).__name__}: {err}")
                self.metrics.load_failures.labels(name).inc()
                log(
                    logging.ERROR,
                    "model_load_failed",
                    model=name,
                    version=version,
                    path=str(vdir),
                    error=f"{type(err).__name__}: {err}",
                    serving=sorted(current) or None,
                )
                if served is not None:
                    keep[version] = served
        if entry is not None and keep == entry.versions and config == entry.config:
            return False
        retired = [v for k, v in current.items() if keep.get(k) is not v]
        self.models[name] = ModelEntry(name, keep, config)  # one assignment: atomic publish
        self.metrics.loaded.labels(name).set(len(keep))
        for v in retired:
            self._retire(v)
        if keep != current:
            log(logging.INFO, "model_versions", model=name, versions=sorted(keep))
        return True

    def _retire(self, served: ServedVersion) -> None:
        log(logging.INFO, "model_unloaded", model=served.name, version=served.version)
        if self.loop is not None and served.batcher is not None:
            asyncio.run_coroutine_threadsafe(served.close(), self.loop)

    # -- lookup (event loop) ----------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> ServedVersion:
        entry = self.models.get(name)
        if entry is None or not entry.versions:
            raise ServingError(404, f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        if version is None:
            return entry.latest
        served = entry.versions.get(version)
        if served is None:
            raise ServingError(
                404,
                f"model {name!r} has no version {version} loaded; loaded versions: "
                f"{sorted(entry.versions)}",
            )
        return served

    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise ServingError(404, f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        return entry

    async def close(self) -> None:
        for entry in list(self.models.values()):
            for v in entry.versions.values():
                await v.close()
        self.executor.shutdown(wait=False)
