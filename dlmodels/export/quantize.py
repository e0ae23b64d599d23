"""Post-training quantization of ONNX files with onnxruntime.quantization.

On this class of CPU (AVX-512 VNNI) static QDQ with uint8 activations and per-channel int8
weights is the configuration that is actually faster than fp32 for CNNs (FIELD_NOTES: ResNet-50
18 ms -> 6.6 ms); dynamic quantization makes CNNs ~8x slower but helps LSTM/Dense-heavy models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
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

from dlmodels.export._atomic import atomic_path, check_target

MODES = ("static", "dynamic", "fp16")

logger = logging.getLogger(__name__)


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator.

    Accepts a numpy array (N, ...) (split into batches of `batch_size`), an iterable of numpy
    batches, or a tf.data.Dataset yielding images or (images, labels) tuples. Unbatched samples
    (rank one less than the graph input) get a batch axis. Only the first graph input is fed;
    multi-input models need a reader of their own. `rewind()` restarts arrays, lists and
    datasets; a one-shot generator can only be read once.

    Args:
        calibration: the data, as above.
        input_name: the graph input to feed.
        input_rank: rank of that input (to recognise unbatched samples).
        batch_size: batch size used when `calibration` is one array.
        max_samples: stop after this many samples (calibration cost grows linearly).
    """

    def __init__(
        self,
        calibration,
        *,
        input_name: str,
        input_rank: int,
        batch_size: int = 8,
        max_samples: int | None = None,
    ):
        self.input_name = input_name
        self.input_rank = input_rank
        self.batch_size = batch_size
        self.max_samples = max_samples
        self._source = calibration
        self._iter: Iterator[np.ndarray] | None = None
        self.samples_seen = 0

    def _batches(self) -> Iterator[np.ndarray]:
        data = self._source
        if isinstance(data, np.ndarray):
            if data.ndim == self.input_rank - 1:
                data = data[None]
            source: Iterable = (
                data[i : i + self.batch_size] for i in range(0, len(data), self.batch_size)
            )
        elif hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset, without importing TF here
            source = data.as_numpy_iterator()
        else:
            source = iter(data)
        for item in source:
            if isinstance(item, tuple | list):
                item = item[0]  # (images, labels)
            elif isinstance(item, dict):
                item = item[self.input_name]
            x = np.asarray(item)
            if x.ndim == self.input_rank - 1:
                x = x[None]
            if x.ndim != self.input_rank:
                raise ValueError(
                    f"calibration batch has shape {x.shape}; the graph input "
                    f"{self.input_name!r} has rank {self.input_rank}"
                )
            if x.dtype == np.float64:
                x = x.astype(np.float32)
            if self.max_samples is not None:
                left = self.max_samples - self.samples_seen
                if left <= 0:
                    return
                x = x[:left]
            self.samples_seen += len(x)
            yield x

    def get_next(self):
        if self._iter is None:
            self._iter = self._batches()
        x = next(self._iter, None)
        return None if x is None else {self.input_name: x}

    def rewind(self):
        self._iter = None
        self.samples_seen = 0


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


def _first_input(path: Path) -> tuple[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    return inputs[0].name, len(inputs[0].type.tensor_type.shape.dim)


def quantize(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    calibration=None,
    mode: str = "static",
    per_channel: bool = True,
    overwrite: bool = False,
    max_calibration_samples: int | None = 256,
) -> Path:
    """Quantize an fp32 ONNX file and write the result atomically.

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
        onnx_path: the fp32 ONNX file (e.g. from `to_onnx`).
        out_path: destination file.
        calibration: for "static": a numpy array (N, ...), an iterable of numpy batches, or a
            tf.data.Dataset yielding images or (images, labels). Use data like the data the
            model will see (a few dozen to a few hundred samples).
        mode: "static", "dynamic" or "fp16".
        per_channel: per-output-channel weight scales (static/dynamic).
        overwrite: replace an existing `out_path`; otherwise FileExistsError before any work.
        max_calibration_samples: cap on calibration samples (None: use everything).

    Returns:
        The path written.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if mode not in MODES:
        raise ValueError(
            f"unknown quantization mode {mode!r}; choose one of {MODES} ('static' for CNNs, "
            "'dynamic' for LSTM/Dense-heavy models)."
        )
    if mode == "static" and calibration is None:
        raise ValueError(
            "mode='static' needs `calibration` data (an array, iterable of batches or "
            "tf.data.Dataset of representative inputs); use mode='dynamic' to quantize without."
        )
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    check_target(out_path, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="dlmodels-quant-") as tmp:
        if mode == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            fp16 = convert_float_to_float16(
                onnx.load(str(onnx_path)), keep_io_types=True, disable_shape_infer=False
            )
            with atomic_path(out_path, overwrite=overwrite) as dst:
                onnx.save(fp16, str(dst))
            return out_path
        pre = Path(tmp) / "preprocessed.onnx"
        _pre_process(onnx_path, pre)
        quantized = Path(tmp) / "quantized.onnx"
        if mode == "static":
            name, rank = _first_input(pre)
            reader = ArrayCalibrationReader(
                calibration, input_name=name, input_rank=rank, max_samples=max_calibration_samples
            )
            # Peek so an empty dataset fails here with a clear message, not deep in ORT.
            first = reader.get_next()
            if first is None:
                raise ValueError("`calibration` yielded no samples")
            reader.rewind()
            quantize_static(
                str(pre),
                str(quantized),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        else:
            quantize_dynamic(
                str(pre), str(quantized), per_channel=per_channel, weight_type=QuantType.QInt8
            )
        with atomic_path(out_path, overwrite=overwrite) as dst:
            dst.write_bytes(quantized.read_bytes())
    return out_path
