"""Post-training quantization of ONNX files with onnxruntime.quantization.

On this class of CPU (AVX-512 VNNI) static QDQ with uint8 activations and per-channel int8
weights is the configuration that is actually faster than fp32 for CNNs (FIELD_NOTES: ResNet-50
18 ms -> 6.6 ms); dynamic quantization makes CNNs ~8x slower but helps LSTM/Dense-heavy models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

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
        calibration_method: "minmax", "entropy" or "percentile" for static, else None.
        calibration_samples / calibration_batches: what the calibrator actually read.
        percentile: the percentile of the "percentile" method.
        nodes_to_exclude: nodes left in float on request (static).
        extra_options: onnxruntime `extra_options` given to `quantize_static`.
        coverage: `quantized_ops(...)` summary: which ops run in int8 and why the rest do not.
        selection: for `select_quantization`: every candidate's held-out score and the choice.
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
    percentile: float | None = None
    nodes_to_exclude: list[str] | None = None
    extra_options: dict | None = None
    coverage: dict | None = None
    selection: dict | None = None

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


CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
"""Names of onnxruntime's static calibration methods."""

DEFAULT_PERCENTILE = 99.999
"""onnxruntime's default for the "percentile" method."""

DEFAULT_EXTRA_OPTIONS: dict = {}
"""onnxruntime `extra_options` of every static quantization unless the caller gives others.

onnxruntime's defaults are kept: nothing tried made the int8 graph faster. Measured on this
2-core AVX512-VNNI machine under heavy shared load (fp32 and all variants timed interleaved,
speed-up over onnxruntime fp32, U-Net 128x128 / ResNet-50 224x224): the default (pre-processed,
U8S8 per-channel, every QDQ op type, ORT_ENABLE_ALL) x2.3-4.3 (U-Net b1), x2.9-3.5 (U-Net b32),
x3.9-5.2 (ResNet-50 b1); S8S8 x1.1-1.8 (slower at every size); ActivationSymmetric x2.1-2.9 and
per-tensor weights x0.9-2.7, both with larger errors; only Conv/MatMul/Gemm quantized (Add,
Concat, MaxPool, Resize float) x0.7-2.5 (the profile shows 23% of the time going to the extra
Q/DQ and float Relu); Resize left float x2.5-2.7 (QLinearConcat then requantizes); no
quant_pre_process x2.9-3.3; QDQKeepRemovableActivations, DedicatedQDQPair and QuantizeBias=False
within the noise of the default; the int8 session at ORT_ENABLE_EXTENDED instead of ALL
x1.0-1.8 (ALL moves QLinearConv to NHWC). onnxruntime's profiler (`dlmodels.bench.export
--profile`) puts 88-98% of the int8 time in QLinearConv: what is left to gain is in the int8
conv kernels, not in the QDQ placement."""


def _calibration_reader(calibration, graph: Path, batch_size, max_samples):
    if isinstance(calibration, ArrayCalibrationReader):
        return calibration
    inputs = _graph_inputs(graph)
    return ArrayCalibrationReader(
        calibration,
        input_names=[n for n, _, _ in inputs],
        input_ranks=[r for _, r, _ in inputs],
        input_dtypes=[d for _, _, d in inputs],
        batch_size=batch_size,
        max_samples=max_samples,
    )


class _Prepared(NamedTuple):
    pre: Path
    reader: ArrayCalibrationReader | None
    reduce_range: bool
    reduce_range_reason: str


def _prepare(
    onnx_path: Path,
    out_path: Path,
    tmp: Path,
    *,
    overwrite: bool,
    reduce_range: bool | None,
    calibration=None,
    batch_size: int = 8,
    max_samples: int | None = None,
) -> _Prepared:
    """The setup `quantize_with_report` and `select_quantization` share: refuse a missing
    source or an existing target before any work, choose `reduce_range` (and say why),
    pre-process into `tmp`, and, given `calibration`, a reader over the pre-processed graph's
    inputs that has already read one batch."""
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    check_target(out_path, overwrite=overwrite)
    if reduce_range is None:
        reduce_range, reason = default_reduce_range()
    else:
        reduce_range, reason = bool(reduce_range), "argument"
    pre = tmp / "preprocessed.onnx"
    _pre_process(onnx_path, pre)
    reader = None
    if calibration is not None:
        reader = _calibration_reader(calibration, pre, batch_size, max_samples)
        # Peek so an empty data set fails here with a clear message, not deep in ORT; the
        # reader keeps what it read, so rewinding replays the peeked batch too.
        if reader.get_next() is None:
            raise UserError("`calibration` yielded no samples")
    return _Prepared(pre, reader, reduce_range, reason)


def _check_method(calibration_method, percentile):
    if calibration_method not in CALIBRATION_METHODS:
        raise UserError(
            f"calibration_method={calibration_method!r} is not known; choose one of "
            f"{sorted(CALIBRATION_METHODS)} ('minmax' keeps every value in range, 'percentile' "
            "and 'entropy' clip outliers)."
        )
    if percentile is not None and not 0.0 < float(percentile) <= 100.0:
        raise UserError(f"percentile must be in (0, 100], got {percentile!r}")


def _static(
    pre: Path,
    out: Path,
    reader: ArrayCalibrationReader,
    *,
    per_channel: bool,
    reduce_range: bool,
    calibration_method: str,
    percentile: float | None,
    nodes_to_exclude: Sequence[str],
    extra_options: Mapping | None,
) -> None:
    """quantize_static on an already pre-processed file (QDQ, U8S8)."""
    options = dict(DEFAULT_EXTRA_OPTIONS if extra_options is None else extra_options)
    if calibration_method == "percentile":
        options.setdefault("CalibPercentile", float(percentile or DEFAULT_PERCENTILE))
    reader.rewind()
    # The histogram calibrators print progress to stdout, which would corrupt JSON written
    # there (`dlmodels quantize --json`): keep it for the debug log.
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        _quantize_static(pre, out, reader, per_channel, reduce_range, calibration_method,
                         nodes_to_exclude, options)  # fmt: skip
    if chatter.getvalue().strip():
        logger.debug("onnxruntime calibration: %s", chatter.getvalue().strip())


def _quantize_static(pre, out, reader, per_channel, reduce_range, method, exclude, options):
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CALIBRATION_METHODS[method],
        nodes_to_exclude=list(exclude),
        extra_options=options,
    )


def _static_report(
    out_path: Path,
    quantized: Path,
    reader: ArrayCalibrationReader,
    *,
    per_channel: bool,
    reduce_range: bool,
    reduce_range_reason: str,
    calibration_method: str,
    percentile: float | None,
    nodes_to_exclude: Sequence[str],
    extra_options: Mapping | None,
    selection: dict | None = None,
) -> QuantizeReport:
    """The QuantizeReport of a static (QDQ) file: one builder for `quantize_with_report` and
    `select_quantization`, so their manifest entries cannot drift apart."""
    return QuantizeReport(
        path=out_path,
        mode="static",
        format="QDQ",
        per_channel=bool(per_channel),
        activation_type="uint8",
        weight_type="int8",
        reduce_range=reduce_range,
        reduce_range_reason=reduce_range_reason,
        calibration_method=calibration_method,
        calibration_samples=reader.samples_seen,
        calibration_batches=reader.batches_seen,
        percentile=(
            float(percentile or DEFAULT_PERCENTILE) if calibration_method == "percentile" else None
        ),
        nodes_to_exclude=list(nodes_to_exclude),
        extra_options=dict(DEFAULT_EXTRA_OPTIONS if extra_options is None else extra_options),
        coverage=quantized_ops(quantized, nodes_to_exclude=nodes_to_exclude)["summary"],
        selection=selection,
    )


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
    calibration_method: str = "minmax",
    percentile: float | None = None,
    nodes_to_exclude: Sequence[str] | str = (),
    extra_options: Mapping | None = None,
) -> QuantizeReport:
    """Quantize an fp32 ONNX file, write the result atomically and say how it was done.

    Modes:
        "static": QDQ format, activations QUInt8, weights QInt8 (per channel by default),
            ranges from `calibration` (MinMax by default). The fast choice for CNNs on x86 with
            VNNI. Conv2DTranspose stays fp32 (onnxruntime has no int8 kernel for it). The
            report's `coverage` (`quantized_ops`) says which ops run in int8 and why the others
            do not; `select_quantization` picks the settings by a held-out metric.
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
        calibration_method: "minmax", "entropy" or "percentile" (static).
        percentile: the percentile kept by "percentile" (default 99.999).
        nodes_to_exclude: node names (of the pre-processed graph; see `compute_nodes`) left in
            float, or "first_last": the first and the last Conv / MatMul / Gemm.
        extra_options: onnxruntime `quantize_static` extra_options (default
            `DEFAULT_EXTRA_OPTIONS`).

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
    _check_method(calibration_method, percentile)
    if mode == "fp16":
        if not onnx_path.is_file():
            raise FileNotFoundError(f"no ONNX file at {onnx_path}")
        check_target(out_path, overwrite=overwrite)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        fp16 = convert_float_to_float16(
            onnx.load(str(onnx_path)), keep_io_types=True, disable_shape_infer=False
        )
        with atomic_path(out_path, overwrite=overwrite) as dst:
            onnx.save(fp16, str(dst))
        return QuantizeReport(path=out_path, mode=mode, weight_type="float16")
    with tempfile.TemporaryDirectory(prefix="dlmodels-quant-") as tmp:
        pre, reader, reduce_range, reason = _prepare(
            onnx_path,
            out_path,
            Path(tmp),
            overwrite=overwrite,
            reduce_range=reduce_range,
            calibration=calibration if mode == "static" else None,
            batch_size=batch_size,
            max_samples=max_calibration_samples,
        )
        quantized = Path(tmp) / "quantized.onnx"
        if mode == "static":
            excluded = _resolve_exclude(pre, nodes_to_exclude)
            settings = {
                "per_channel": per_channel,
                "calibration_method": calibration_method,
                "percentile": percentile,
                "nodes_to_exclude": excluded,
                "extra_options": extra_options,
            }
            _static(pre, quantized, reader, reduce_range=reduce_range, **settings)
            report = _static_report(
                out_path, quantized, reader, reduce_range=reduce_range,
                reduce_range_reason=reason, **settings,
            )  # fmt: skip
        else:
            quantize_dynamic(
                str(pre),
                str(quantized),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
            report = QuantizeReport(
                path=out_path,
                mode=mode,
                format="QOperator",
                per_channel=bool(per_channel),
                activation_type="uint8",
                weight_type="int8",
                reduce_range=reduce_range,
                reduce_range_reason=reason,
            )
        with atomic_path(out_path, overwrite=overwrite) as dst:
            dst.write_bytes(quantized.read_bytes())
    return report


# -- which ops run in int8, and why the others do not ------------------------------------------

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
"""The op types that carry (almost) all the arithmetic of a CNN / MLP."""

# Inputs that carry data (the rest are shapes, scales, axes, clip bounds, biases); for op types
# not listed every input is data.
_DATA_INPUTS = {
    "Conv": (0, 1),
    "ConvTranspose": (0, 1),
    "Gemm": (0, 1),
    "BatchNormalization": (0,),
    "InstanceNormalization": (0,),
    "LayerNormalization": (0,),
    "Resize": (0,),
    "Upsample": (0,),
    "Reshape": (0,),
    "Slice": (0,),
    "Pad": (0,),
    "Clip": (0,),
    "Split": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Gather": (0,),
    "GatherElements": (0,),
    "TopK": (0,),
    "CumSum": (0,),
    "ReduceMean": (0,),
    "ReduceMax": (0,),
    "ReduceMin": (0,),
    "ReduceSum": (0,),
}
_SHAPE_OPS = {"Shape", "Size"}  # read a tensor's shape, never its values
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


def qdq_quantizable_op_types() -> set[str]:
    """The op types onnxruntime's static QDQ quantizer quantizes by default (its registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def compute_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the Conv / ConvTranspose / MatMul / Gemm nodes of a graph, in graph order.

    Quantization excludes nodes by name in the pre-processed graph (`quant_pre_process` folds
    BatchNorm into Conv and may rename nothing else): call this on that graph or on the fp32
    file, whose compute node names survive pre-processing.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS]


def _resolve_exclude(graph: Path, nodes_to_exclude) -> list[str]:
    if isinstance(nodes_to_exclude, str):
        if nodes_to_exclude != "first_last":
            raise UserError(
                f"nodes_to_exclude={nodes_to_exclude!r}: give a list of node names or "
                "'first_last' (the first and last Conv / MatMul / Gemm)"
            )
        names = compute_nodes(graph)
        return sorted({names[0], names[-1]}) if names else []
    names = [str(n) for n in nodes_to_exclude]
    if names:
        known = {n.name for n in onnx.load(str(graph), load_external_data=False).graph.node}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(
                f"nodes_to_exclude names nodes the graph does not have: {unknown}; node names "
                f"of the compute ops: {compute_nodes(graph)[:8]}..."
            )
    return names


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help here, not a requirement
        inferred = model
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in g.node:  # what the quantizer wrote is known without inference
        if n.op_type == "DequantizeLinear":
            types[n.output[0]] = onnx.TensorProto.FLOAT
        elif n.op_type in _SHAPE_OPS:
            types[n.output[0]] = onnx.TensorProto.INT64
    return types


def _runtime_float_nodes(path: Path) -> set[str] | None:
    """Nodes onnxruntime's CPU provider still runs in float after its QDQ fusions: in the graph
    it optimizes (level "extended"), a compute op still fed by a DequantizeLinear."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="dlmodels-qops-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            optimized = onnx.load(opts.optimized_model_filepath)
        except Exception as err:  # a check, not a requirement
            logger.info("could not read onnxruntime's optimized graph: %s", err)
            return None
    producer = {o: n for n in optimized.graph.node for o in n.output}
    out = set()
    for n in optimized.graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        idx = _DATA_INPUTS.get(n.op_type, range(len(n.input)))
        ins = [n.input[i] for i in idx if i < len(n.input) and n.input[i]]
        if any(
            producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in ins
        ):
            out.add(n.name)
    return out


def quantized_ops(
    onnx_path: str | os.PathLike,
    *,
    nodes_to_exclude: Sequence[str] = (),
    op_types_to_quantize: Sequence[str] | None = None,
    runtime: bool = True,
) -> dict:
    """Which nodes of a QDQ model run in int8, and why each float one stayed float.

    A node runs in int8 when every float data input (inputs that carry values: not shapes,
    scales, axes or biases) comes from a DequantizeLinear and every float output goes only to
    QuantizeLinear nodes: then onnxruntime fuses DQ -> op -> Q into an integer kernel
    (QLinearConv, QLinearAdd, ...) or runs the op on the 8-bit tensor directly (MaxPool,
    Transpose, Reshape). Shape arithmetic (no float values in or out, e.g. Shape -> Gather ->
    Concat on int64) is counted apart as "not applicable". The reason of a float node is the
    first that holds of:
        "excluded": its name is in `nodes_to_exclude`;
        "op type": onnxruntime's QDQ quantizer does not quantize the op type (or it is not in
            `op_types_to_quantize`);
        "input": a float data input is not quantized (says from where);
        "output": an output is not quantized (says who reads it in float, or graph output);
        "no int8 kernel": quantized in the graph, but onnxruntime's CPU provider keeps the
            DequantizeLinear and runs the op in float (e.g. ConvTranspose), found in the graph
            onnxruntime optimizes (with `runtime=True`).

    Args:
        onnx_path: a QDQ model (from `quantize`).
        nodes_to_exclude: the node names the quantization was told to leave float.
        op_types_to_quantize: the op types it was told to quantize (None: onnxruntime's default).
        runtime: also ask onnxruntime which compute nodes it fused into int8 kernels.

    Returns:
        {"nodes": [{"name", "op_type", "int8", "reason"}] (not-applicable nodes left out),
        "summary": {"int8_nodes", "float_nodes", "share_int8", "compute_int8", "compute_total",
        "compute_share_int8" (Conv / ConvTranspose / MatMul / Gemm), "by_op_type": {op: {"int8",
        "float"}}, "float": [{"name", "op_type", "reason"}], "not_applicable": {op: count}}}.
    """
    model = onnx.load(str(onnx_path))
    graph = model.graph
    types = _tensor_types(model)
    inits = {i.name for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - inits
    graph_outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    allowed = set(op_types_to_quantize) if op_types_to_quantize else qdq_quantizable_op_types()
    excluded = set(nodes_to_exclude)
    runtime_float = _runtime_float_nodes(Path(onnx_path)) if runtime else None

    def is_float(t):
        return bool(t) and types.get(t, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    def source(t):
        if t in graph_inputs:
            return "the graph input"
        if t in inits:
            return "a float initializer"
        p = producer.get(t)
        return f"{p.op_type} {p.name!r}" if p is not None else "nowhere"

    nodes, not_applicable = [], {}
    for n in graph.node:
        if n.op_type in _QDQ:
            continue
        idx = _DATA_INPUTS.get(n.op_type, range(len(n.input)))
        data_in = [n.input[i] for i in idx if i < len(n.input) and is_float(n.input[i])]
        float_out = [t for t in n.output if is_float(t)]
        if n.op_type in _SHAPE_OPS or not (data_in or float_out):
            not_applicable[n.op_type] = not_applicable.get(n.op_type, 0) + 1
            continue
        reason = None
        if n.name in excluded:
            reason = "excluded: named in nodes_to_exclude"
        elif n.op_type not in allowed:
            reason = f"op type: {n.op_type} is not quantized by onnxruntime's QDQ quantizer"
        else:
            for t in data_in:
                p = producer.get(t)
                if p is None or p.op_type != "DequantizeLinear":
                    reason = f"input: {t!r} (from {source(t)}) is not quantized"
                    break
        if reason is None:
            for t in float_out:
                readers = consumers.get(t, [])
                floats = [c for c in readers if c.op_type != "QuantizeLinear"]
                if t in graph_outputs:
                    reason = f"output: {t!r} is a graph output in float"
                elif not readers:
                    reason = f"output: {t!r} is not read"
                elif floats:
                    reason = (
                        f"output: {t!r} is read in float by {floats[0].op_type} {floats[0].name!r}"
                    )
                if reason:
                    break
        if reason is None and runtime_float is not None and n.name in runtime_float:
            reason = (
                f"no int8 kernel: onnxruntime's CPU provider runs {n.op_type} in float "
                "between DequantizeLinear and QuantizeLinear"
            )
        nodes.append(
            {"name": n.name, "op_type": n.op_type, "int8": reason is None, "reason": reason}
        )

    by_op: dict[str, dict] = {}
    for r in nodes:
        entry = by_op.setdefault(r["op_type"], {"int8": 0, "float": 0})
        entry["int8" if r["int8"] else "float"] += 1
    n_int8 = sum(r["int8"] for r in nodes)
    compute = [r for r in nodes if r["op_type"] in COMPUTE_OPS]
    compute_int8 = sum(r["int8"] for r in compute)
    summary = {
        "int8_nodes": n_int8,
        "float_nodes": len(nodes) - n_int8,
        "share_int8": n_int8 / len(nodes) if nodes else 0.0,
        "compute_int8": compute_int8,
        "compute_total": len(compute),
        "compute_share_int8": compute_int8 / len(compute) if compute else 0.0,
        "by_op_type": dict(sorted(by_op.items())),
        "float": [
            {"name": r["name"], "op_type": r["op_type"], "reason": r["reason"]}
            for r in nodes
            if not r["int8"]
        ],
        "not_applicable": dict(sorted(not_applicable.items())),
        "runtime_checked": runtime_float is not None,
    }
    return {"nodes": nodes, "summary": summary}


# -- choosing the settings by a held-out metric ------------------------------------------------

DEFAULT_CANDIDATES = (
    {"calibration_method": "minmax", "per_channel": True},
    {"calibration_method": "minmax", "per_channel": False},
    {"calibration_method": "percentile", "per_channel": True},
    {"calibration_method": "entropy", "per_channel": True},
    {"calibration_method": "minmax", "per_channel": True, "nodes_to_exclude": "first_last"},
)
"""The default grid of `select_quantization`: the three calibration methods, per-channel on/off,
and the first / last compute op left in float (commonly the most sensitive). First is the
default of `quantize`, which also wins ties."""

_CANDIDATE_KEYS = ("calibration_method", "per_channel", "percentile", "nodes_to_exclude")


def mean_abs_error(outputs, reference) -> float:
    """Mean |outputs - reference| over every output (the default score: lower is better)."""
    outs = outputs if isinstance(outputs, list) else [outputs]
    refs = reference if isinstance(reference, list) else [reference]
    total = sum(
        float(np.abs(o.astype(np.float64) - r).sum()) for o, r in zip(outs, refs, strict=True)
    )
    return total / sum(r.size for r in refs)


def _check_candidates(candidates) -> list[dict]:
    out = []
    for i, c in enumerate(candidates):
        if not isinstance(c, Mapping):
            raise UserError(f"candidates[{i}] is {c!r}; give dicts with keys {_CANDIDATE_KEYS}")
        unknown = sorted(set(c) - set(_CANDIDATE_KEYS))
        if unknown:
            raise UserError(
                f"candidates[{i}] has unknown keys {unknown}; allowed: {list(_CANDIDATE_KEYS)}"
            )
        c = {"calibration_method": "minmax", "per_channel": True, **c}
        _check_method(c["calibration_method"], c.get("percentile"))
        out.append(c)
    if not out:
        raise UserError("candidates is empty; give at least one settings dict (or None: default)")
    return out


def _run_batches(path: Path, batches: list[dict], threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runs = [sess.run(None, feeds) for feeds in batches]
    outs = [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]
    return outs[0] if len(outs) == 1 else outs


def select_quantization(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    calibration,
    held_out,
    metric=None,
    metric_name: str | None = None,
    greater_is_better: bool = False,
    candidates: Sequence[Mapping] | None = None,
    reduce_range: bool | None = None,
    overwrite: bool = False,
    max_calibration_samples: int | None = 256,
    batch_size: int = 8,
    extra_options: Mapping | None = None,
    threads: int | None = None,
) -> QuantizeReport:
    """Static int8 quantization with the settings that score best on held-out data.

    Every candidate (calibration method, per-channel on/off, nodes left in float) is calibrated
    on `calibration` and then scored on `held_out`, data the calibrator never saw: each
    candidate's outputs on `held_out` are passed to `metric(outputs, fp32_outputs)`, where
    `fp32_outputs` are the fp32 ONNX model's outputs on the same data. The default metric is
    `mean_abs_error` (lower is better); a task metric closes over its labels, e.g.
    `metric=lambda out, _: miou(labels, out), greater_is_better=True`. The best candidate is
    written to `out_path` (ties: the earlier candidate); the report's `selection` holds every
    candidate's settings and score and the index chosen, and lands in the manifest with the rest
    of `settings()`.

    Cost: one calibration and one held-out pass per candidate (pre-processing runs once; the
    calibration data are read once and replayed). "entropy" and "percentile" build histograms
    of every activation and are slower than "minmax".

    Args:
        onnx_path: the fp32 ONNX file.
        out_path: destination of the chosen int8 file.
        calibration: calibration data (see `quantize_with_report`).
        held_out: scoring inputs, in any form `calibration` takes (labels are dropped).
        metric: `metric(outputs, fp32_outputs) -> float`; outputs are one array for a
            single-output graph, else a list in graph-output order. None: `mean_abs_error`.
        metric_name: its name in the report (default: the function's name).
        greater_is_better: True for accuracy-like metrics.
        candidates: dicts with keys calibration_method ("minmax" | "entropy" | "percentile"),
            per_channel, percentile, nodes_to_exclude (names or "first_last"); missing keys
            default to minmax, per-channel, nothing excluded. None: `DEFAULT_CANDIDATES`.
        reduce_range / overwrite / max_calibration_samples / batch_size / extra_options: as
            in `quantize_with_report`.
        threads: onnxruntime intra-op threads for the held-out passes.

    Returns:
        The chosen candidate's QuantizeReport with `selection` = {"metric", "greater_is_better",
        "held_out_samples", "chosen", "candidates": [{"settings", "score" | "error"}]}.
    """
    from dlmodels._progress import track

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    grid = _check_candidates(DEFAULT_CANDIDATES if candidates is None else candidates)
    if calibration is None or held_out is None:
        raise UserError(
            "select_quantization needs `calibration` (to set the ranges) and `held_out` (other "
            "inputs, to score each candidate on); they should not be the same samples."
        )
    metric = mean_abs_error if metric is None else metric
    if not callable(metric):
        raise UserError(f"metric must be callable(outputs, fp32_outputs), got {metric!r}")
    with tempfile.TemporaryDirectory(prefix="dlmodels-select-") as tmp:
        tmp = Path(tmp)
        pre, reader, reduce_range, reason = _prepare(
            onnx_path,
            out_path,
            tmp,
            overwrite=overwrite,
            reduce_range=reduce_range,
            calibration=calibration,
            batch_size=batch_size,
            max_samples=max_calibration_samples,
        )
        scorer = _calibration_reader(held_out, pre, batch_size, None)
        batches = []
        while (feeds := scorer.get_next()) is not None:
            batches.append(feeds)
        if not batches:
            raise UserError("`held_out` yielded no samples")
        reference = _run_batches(onnx_path, batches, threads)
        table = []
        for i, c in enumerate(track(grid, "choosing int8 settings")):
            entry = {
                "settings": {
                    **c,
                    "nodes_to_exclude": _resolve_exclude(pre, c.get("nodes_to_exclude", ())),
                }
            }
            path = tmp / f"candidate{i}.onnx"
            try:
                _static(
                    pre,
                    path,
                    reader,
                    per_channel=bool(c["per_channel"]),
                    reduce_range=reduce_range,
                    calibration_method=c["calibration_method"],
                    percentile=c.get("percentile"),
                    nodes_to_exclude=entry["settings"]["nodes_to_exclude"],
                    extra_options=extra_options,
                )
                entry["score"] = float(metric(_run_batches(path, batches, threads), reference))
            except UserError:
                raise
            except Exception as err:  # one failing candidate must not sink the others
                entry["error"] = f"{type(err).__name__}: {err}"
            table.append(entry)
        scored = [i for i, e in enumerate(table) if "score" in e and np.isfinite(e["score"])]
        if not scored:
            raise RuntimeError(
                "no quantization candidate could be scored: "
                + "; ".join(e.get("error", "non-finite score") for e in table)
            )
        sign = -1.0 if greater_is_better else 1.0
        best = min(scored, key=lambda i: (sign * table[i]["score"], i))
        chosen = table[best]["settings"]
        quantized = tmp / f"candidate{best}.onnx"
        report = _static_report(
            out_path,
            quantized,
            reader,
            per_channel=chosen["per_channel"],
            reduce_range=reduce_range,
            reduce_range_reason=reason,
            calibration_method=chosen["calibration_method"],
            percentile=chosen.get("percentile"),
            nodes_to_exclude=chosen["nodes_to_exclude"],
            extra_options=extra_options,
            selection={
                "metric": metric_name or getattr(metric, "__name__", "metric"),
                "greater_is_better": bool(greater_is_better),
                "held_out_samples": scorer.samples_seen,
                "chosen": best,
                "candidates": table,
            },
        )
        with atomic_path(out_path, overwrite=overwrite) as dst:
            dst.write_bytes(quantized.read_bytes())
    return report
