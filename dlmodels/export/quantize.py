"""Post-training quantization of ONNX files with onnxruntime.quantization.

On this class of CPU (AVX-512 VNNI) static QDQ with uint8 activations and per-channel int8
weights is the configuration that is actually faster than fp32 for CNNs (FIELD_NOTES: ResNet-50
18 ms -> 6.6 ms); dynamic quantization makes CNNs ~8x slower but helps LSTM/Dense-heavy models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from dlmodels.errors import UserError
from dlmodels.export._atomic import atomic_path, check_target

MODES = ("static", "dynamic", "fp16")
REDUCE_RANGE_ENV = "DLMODELS_REDUCE_RANGE"

logger = logging.getLogger(__name__)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_reduce_range() -> tuple[bool, str]:
    """Whether static int8 should use 7-bit weights (`reduce_range`), and why.

    On x86 without VNNI, onnxruntime's uint8 x int8 kernels (`vpmaddubsw`) add pairs of products
    into int16 and can saturate; 7-bit weights avoid that at a small accuracy cost. With VNNI
    (AVX512-VNNI or AVX-VNNI: `vpdpbusd` accumulates in int32) and on ARM there is no
    saturation, so full 8-bit weights are used. `DLMODELS_REDUCE_RANGE=0|1` overrides the choice
    (e.g. when the artifact will run on a different CPU than the exporting one).

    Returns:
        (reduce_range, reason) where reason is recorded in the manifest.
    """
    env = os.environ.get(REDUCE_RANGE_ENV)
    if env is not None and env.strip() != "":
        value = env.strip().lower() in ("1", "true", "yes", "on")
        return value, f"{REDUCE_RANGE_ENV}={env.strip()}"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        flags = _cpu_flags()
        vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"})
        if vnni:
            return False, f"x86 with {'/'.join(vnni)}"
        return True, "x86 without VNNI (uint8*int8 pairs can saturate int16)"
    return False, f"{machine or 'unknown machine'}: no int16 saturation"


def _graph_inputs(path: Path) -> list[tuple[str, int, np.dtype]]:
    """(name, rank, numpy dtype) of every non-initializer graph input, in graph order."""
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in init:
            continue
        tt = i.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        out.append((i.name, len(tt.shape.dim), dtype))
    return out


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches for every graph input to onnxruntime's calibrator.

    Accepted data, for a graph with inputs `input_names`:
        - one numpy array (N, ...) for a single-input graph, split into batches of `batch_size`;
        - a dict of arrays keyed by input name, or a list/tuple with one (N, ...) array per input
          in graph order (recognised when its length equals the number of inputs and every
          array has the rank of its input), split into batches of `batch_size`;
        - an iterable of batches (lists, generators, tf.data.Dataset). Each batch is an array
          (single input), a dict by input name, a tuple/list of one array per input in graph
          order, or `(features, labels)` where features is one of those. Trailing labels are
          ignored: `(x, y)` for a single input, `(x1, x2, y)` for two inputs.
    Unbatched samples (rank one less than the graph input) get a batch axis; values are cast to
    the graph input's dtype.

    Every batch read from the source is kept, so `rewind()` replays exactly what was read, also
    for one-shot generators, and peeking (`get_next` then `rewind`) never drops a batch.
    `samples_seen` / `batches_seen` count the distinct samples and batches read from the source.

    Args:
        calibration: the data, as above.
        input_names: the graph inputs to feed, in graph order.
        input_ranks: rank of each input (to recognise unbatched samples).
        input_dtypes: numpy dtype of each input (default float32).
        input_name / input_rank: the single-input spelling of the two arguments above.
        batch_size: batch size used when the data are whole arrays.
        max_samples: stop after this many samples (calibration cost grows linearly).
    """

    def __init__(
        self,
        calibration,
        *,
        input_names: Sequence[str] | None = None,
        input_ranks: Sequence[int] | None = None,
        input_dtypes: Sequence | None = None,
        input_name: str | None = None,
        input_rank: int | None = None,
        batch_size: int = 8,
        max_samples: int | None = None,
    ):
        if input_names is None:
            if input_name is None or input_rank is None:
                raise UserError(
                    "ArrayCalibrationReader needs input_names and input_ranks (or input_name and "
                    "input_rank for a single-input graph)."
                )
            input_names, input_ranks = [input_name], [input_rank]
        self.input_names = list(input_names)
        self.input_ranks = [int(r) for r in input_ranks]
        if len(self.input_ranks) != len(self.input_names):
            raise UserError(
                f"input_ranks has {len(self.input_ranks)} entries for "
                f"{len(self.input_names)} input_names; give one rank per input."
            )
        dtypes = input_dtypes or [np.float32] * len(self.input_names)
        self.input_dtypes = [np.dtype(d) for d in dtypes]
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.max_samples = max_samples
        self._source = calibration
        self._source_iter: Iterator | None = None
        self._exhausted = False
        self._cache: list[dict[str, np.ndarray]] = []
        self._pos = 0
        self.samples_seen = 0

    @property
    def batches_seen(self) -> int:
        """Distinct batches read from the source so far."""
        return len(self._cache)

    # -- reading the source ---------------------------------------------------------------

    def _is_per_input_arrays(self, data) -> bool:
        if isinstance(data, Mapping):
            return all(isinstance(data.get(n), np.ndarray) for n in self.input_names)
        if isinstance(data, list | tuple) and len(self.input_names) > 1:
            return len(data) == len(self.input_names) and all(
                isinstance(a, np.ndarray) and a.ndim == r
                for a, r in zip(data, self.input_ranks, strict=True)
            )
        return False

    def _source_batches(self) -> Iterable:
        data = self._source
        if isinstance(data, np.ndarray):
            if len(self.input_names) != 1:
                raise UserError(
                    f"calibration is one array but the graph has inputs {self.input_names}; "
                    "pass a dict of arrays keyed by input name or a list in graph order."
                )
            return self._split([data])
        if self._is_per_input_arrays(data):
            arrays = (
                [data[n] for n in self.input_names] if isinstance(data, Mapping) else list(data)
            )
            return self._split(arrays)
        if hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset, without importing TF here
            return data.as_numpy_iterator()
        return iter(data)

    def _split(self, arrays: list[np.ndarray]) -> Iterator:
        arrays = [
            a[None] if a.ndim == r - 1 else a for a, r in zip(arrays, self.input_ranks, strict=True)
        ]
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise UserError(
                f"calibration arrays have different lengths {[len(a) for a in arrays]} for "
                f"inputs {self.input_names}; give the same number of samples for every input."
            )
        for i in range(0, n, self.batch_size):
            yield [a[i : i + self.batch_size] for a in arrays]

    def _features(self, item) -> list:
        n = len(self.input_names)
        if isinstance(item, Mapping):
            missing = [k for k in self.input_names if k not in item]
            if missing:
                raise UserError(
                    f"calibration batch has keys {sorted(item)}; it lacks graph inputs {missing}"
                )
            return [item[k] for k in self.input_names]
        if isinstance(item, list | tuple):
            if item and isinstance(item[0], Mapping | list | tuple):
                return self._features(item[0])  # (features, labels)
            if n == 1:
                return [item[0]]  # (images, labels)
            if len(item) < n:
                raise UserError(
                    f"calibration batch has {len(item)} arrays; the graph has inputs "
                    f"{self.input_names} (give one array per input, in graph order)."
                )
            return list(item[:n])
        if n != 1:
            raise UserError(
                f"calibration batch is one array but the graph has inputs {self.input_names}; "
                "yield a dict by input name or a tuple in graph order."
            )
        return [item]

    def _prepare(self, item) -> dict[str, np.ndarray] | None:
        feeds = {}
        for name, rank, dtype, x in zip(
            self.input_names,
            self.input_ranks,
            self.input_dtypes,
            self._features(item),
            strict=True,
        ):
            x = np.asarray(x)
            if x.ndim == rank - 1:
                x = x[None]
            if x.ndim != rank:
                raise UserError(
                    f"calibration batch for {name!r} has shape {x.shape}; the graph input "
                    f"{name!r} has rank {rank}"
                )
            feeds[name] = np.ascontiguousarray(x, dtype=dtype)
        sizes = {len(v) for v in feeds.values()}
        if len(sizes) != 1:
            raise UserError(f"calibration batch inputs have different batch sizes {sizes}")
        size = sizes.pop()
        if self.max_samples is not None:
            left = self.max_samples - self.samples_seen
            if left <= 0:
                return None
            if size > left:
                feeds = {k: v[:left] for k, v in feeds.items()}
                size = left
        self.samples_seen += size
        return feeds

    def _read_one(self) -> dict[str, np.ndarray] | None:
        if self._exhausted:
            return None
        if self._source_iter is None:
            self._source_iter = iter(self._source_batches())
        for item in self._source_iter:
            feeds = self._prepare(item)
            if feeds is None:
                break
            if len(next(iter(feeds.values()))) == 0:
                continue
            self._cache.append(feeds)
            return feeds
        self._exhausted = True
        return None

    # -- CalibrationDataReader ----------------------------------------------------------------

    def get_next(self):
        if self._pos < len(self._cache):
            feeds = self._cache[self._pos]
        else:
            feeds = self._read_one()
            if feeds is None:
                return None
        self._pos += 1
        return feeds

    def rewind(self):
        """Start again from the first batch (replayed from what was read, never re-read)."""
        self._pos = 0


def _pre_process(src: Path, dst: Path) -> None:
    """quant_pre_process: ORT graph optimization (folds BatchNorm into Conv, ...) plus shape
    inference, so the quantizer sees every tensor's shape.

    Symbolic shape inference gives up on some graphs tf2onnx emits (bilinear `Resize` whose
    sizes are computed from `Shape`, as in the U-Net decoder: "Incomplete symbolic shape
    inference"); ONNX's own shape inference is enough for quantization, so retry with it alone.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    # On failure the symbolic pass dumps `sym_shape_infer_temp.onnx` plus a `<uuid>.data` weights
    # file into the current directory; run it from a scratch directory so nothing leaks.
    with tempfile.TemporaryDirectory(prefix="dlmodels-prequant-") as scratch, _chdir(scratch):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception as err:
            logger.info("symbolic shape inference failed (%s); retrying without it", err)
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


@contextlib.contextmanager
def _chdir(path):
    """contextlib.chdir for Python 3.10. The working directory is process-wide: do not quantize
    from several threads at once."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@dataclasses.dataclass
class QuantizeReport:
    """How an ONNX file was quantized (recorded in manifest.json under `quantization`).

    Attributes:
        path: the file written.
        mode: "static", "dynamic" or "fp16".
        format: "QDQ" for static, "QOperator" for dynamic, None for fp16.
        per_channel: per-output-channel weight scales.
        activation_type / weight_type: "uint8" / "int8" (None where not applicable).
        reduce_range: 7-bit weights (see `default_reduce_range`); None for fp16.
        reduce_range_reason: why: "argument" or the CPU feature that decided it.
        calibration_method: "minmax" for static, else None.
        calibration_samples / calibration_batches: what the calibrator actually read.
    """

    path: Path
    mode: str
    format: str | None = None
    per_channel: bool | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    reduce_range: bool | None = None
    reduce_range_reason: str | None = None
    calibration_method: str | None = None
    calibration_samples: int | None = None
    calibration_batches: int | None = None

    def settings(self) -> dict:
        """The JSON-safe settings (everything but the path)."""
        out = dataclasses.asdict(self)
        out.pop("path")
        return out


def quantize(onnx_path: str | os.PathLike, out_path: str | os.PathLike, **kwargs) -> Path:
    """Quantize an fp32 ONNX file and write the result atomically; return the path.

    The same as `quantize_with_report(...).path`; see there for the arguments.
    """
    return quantize_with_report(onnx_path, out_path, **kwargs).path


def quantize_with_report(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    calibration=None,
    mode: str = "static",
    per_channel: bool = True,
    reduce_range: bool | None = None,
    overwrite: bool = False,
    max_calibration_samples: int | None = 256,
    batch_size: int = 8,
) -> QuantizeReport:
    """Quantize an fp32 ONNX file, write the result atomically and say how it was done.

    Modes:
        "static": QDQ format, activations QUInt8, weights QInt8 (per channel by default),
            MinMax ranges from `calibration`. The fast choice for CNNs on x86 with VNNI.
            Conv2DTranspose stays fp32 (onnxruntime has no int8 kernel for it).
        "dynamic": weights QInt8, activations quantized at run time; no calibration. For
            LSTM / MatMul / Gemm-heavy models (slower than fp32 for CNNs).
        "fp16": weights and compute in float16 with float32 graph inputs/outputs (smaller file;
            on CPUs without fp16 units not faster).

    `quant_pre_process` (shape inference + graph optimization) runs first in a temp directory.

    Args:
        onnx_path: the fp32 ONNX file (from `to_onnx`).
        out_path: destination file.
        calibration: representative inputs for "static", for every graph input: an array
            (single input), a dict of arrays by input name, a list of arrays in graph order, an
            iterable of batches (generators included: every batch is used once read), a
            tf.data.Dataset yielding inputs or (inputs, labels), or an ArrayCalibrationReader
            (to inspect what was read afterwards). Use data like the data the model will see (a
            few dozen to a few hundred samples).
        mode: "static", "dynamic" or "fp16".
        per_channel: per-output-channel weight scales (static/dynamic).
        reduce_range: 7-bit weights; None chooses from this CPU (`default_reduce_range`).
        overwrite: replace an existing `out_path`; otherwise FileExistsError before any work.
        max_calibration_samples: cap on calibration samples (None: use everything).
        batch_size: calibration batch size when `calibration` holds whole arrays.

    Returns:
        A QuantizeReport.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if mode not in MODES:
        raise UserError(
            f"unknown quantization mode {mode!r}; choose one of {MODES} ('static' for CNNs, "
            "'dynamic' for LSTM/Dense-heavy models)."
        )
    if mode == "static" and calibration is None:
        raise UserError(
            "mode='static' needs `calibration` data (an array, iterable of batches or "
            "tf.data.Dataset of representative inputs); use mode='dynamic' to quantize without."
        )
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    check_target(out_path, overwrite=overwrite)
    if reduce_range is None:
        reduce_range, reason = default_reduce_range()
    else:
        reduce_range, reason = bool(reduce_range), "argument"
    with tempfile.TemporaryDirectory(prefix="dlmodels-quant-") as tmp:
        if mode == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            fp16 = convert_float_to_float16(
                onnx.load(str(onnx_path)), keep_io_types=True, disable_shape_infer=False
            )
            with atomic_path(out_path, overwrite=overwrite) as dst:
                onnx.save(fp16, str(dst))
            return QuantizeReport(path=out_path, mode=mode, weight_type="float16")
        pre = Path(tmp) / "preprocessed.onnx"
        _pre_process(onnx_path, pre)
        quantized = Path(tmp) / "quantized.onnx"
        if mode == "static":
            if isinstance(calibration, ArrayCalibrationReader):
                reader = calibration
            else:
                inputs = _graph_inputs(pre)
                reader = ArrayCalibrationReader(
                    calibration,
                    input_names=[n for n, _, _ in inputs],
                    input_ranks=[r for _, r, _ in inputs],
                    input_dtypes=[d for _, _, d in inputs],
                    batch_size=batch_size,
                    max_samples=max_calibration_samples,
                )
            # Peek so an empty data set fails here with a clear message, not deep in ORT; the
            # reader keeps what it read, so rewinding replays the peeked batch too.
            if reader.get_next() is None:
                raise UserError("`calibration` yielded no samples")
            reader.rewind()
            quantize_static(
                str(pre),
                str(quantized),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            by_mode = {
                "format": "QDQ",
                "calibration_method": "minmax",
                "calibration_samples": reader.samples_seen,
                "calibration_batches": reader.batches_seen,
            }
        else:
            quantize_dynamic(
                str(pre),
                str(quantized),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
            by_mode = {"format": "QOperator"}
        report = QuantizeReport(
            path=out_path,
            mode=mode,
            per_channel=bool(per_channel),
            activation_type="uint8",
            weight_type="int8",
            reduce_range=reduce_range,
            reduce_range_reason=reason,
            **by_mode,
        )
        with atomic_path(out_path, overwrite=overwrite) as dst:
            dst.write_bytes(quantized.read_bytes())
    return report
