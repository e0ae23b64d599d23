"""Choosing and applying a mixed-precision policy for training.

Mixed precision (Micikevicius et al. 2018, "Mixed Precision Training", ICLR) computes in a
16-bit type and keeps float32 variables: `mixed_float16` on NVIDIA GPUs with tensor cores
(compute capability >= 7.0; needs loss scaling, which the Trainer applies through
`keras.optimizers.LossScaleOptimizer`), `mixed_bfloat16` on TPUs and on CPUs with bfloat16
instructions (AVX512-BF16 or AMX-BF16; float32's exponent range, so no loss scaling).

`resolve_precision("auto")` picks one from the hardware the strategy runs on, and says why;
`precision_scope(policy)` sets Keras' global dtype policy while models are built (layers take
the policy in force when they are created) and restores the previous one.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
"""What `resolve_precision` accepts."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs with bfloat16 arithmetic that oneDNN uses."""


@dataclass(frozen=True)
class Precision:
    """A Keras dtype policy name and why it was chosen."""

    policy: str
    reason: str

    @property
    def compute_dtype(self) -> str:
        return {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(
            self.policy, "float32"
        )


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in `cpuinfo` (empty when unreadable, e.g.
    not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _logical_gpus() -> list:
    """The physical GPU behind each logical GPU index ("GPU:i"): the visible GPUs in order,
    each repeated once per virtual device it was split into."""
    import tensorflow as tf

    out = []
    for gpu in tf.config.get_visible_devices("GPU"):
        try:
            virtual = tf.config.get_logical_device_configuration(gpu)
        except (RuntimeError, ValueError):
            virtual = None
        out.extend([gpu] * max(1, len(virtual or ())))
    return out


_GPU_INDEX = re.compile(r"GPU:(\d+)$", re.IGNORECASE)


def _gpu_compute_capabilities(devices) -> list[tuple[int, int] | None]:
    """Compute capabilities of the GPUs the devices name (every visible GPU when `devices` is
    None); None for a GPU whose capability TensorFlow does not report."""
    import tensorflow as tf

    logical = _logical_gpus()
    if devices is None:
        chosen = list(dict.fromkeys(logical))
    else:
        indices = [int(m.group(1)) for d in devices if (m := _GPU_INDEX.search(str(d)))]
        chosen = list(dict.fromkeys(logical[i] for i in indices if i < len(logical)))
    out = []
    for gpu in chosen:
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        out.append(tuple(cc) if cc else None)
    return out


def _strategy_devices(strategy) -> list[str] | None:
    if strategy is None:
        return None
    try:
        return [str(d) for d in strategy.extended.worker_devices]
    except (AttributeError, RuntimeError):
        return None


def resolve_precision(
    precision: str = "auto", strategy=None, *, flags: set[str] | None = None
) -> Precision:
    """The dtype policy to train with.

    Args:
        precision: "auto", or a policy name to use as given ("float32", "mixed_float16",
            "mixed_bfloat16").
        strategy: the `tf.distribute` strategy the model will train under (default: look at the
            whole machine). "auto" decides from its devices: a `TPUStrategy` gives
            `mixed_bfloat16`; GPUs, all with compute capability >= 7.0, give `mixed_float16`
            (older GPUs: float32); CPUs with AVX512-BF16 or AMX-BF16 give `mixed_bfloat16`;
            anything else float32.
        flags: CPU feature flags (default: `cpu_flags()`; for tests).

    Returns:
        A `Precision` (policy name and the reason).

    Raises:
        ValueError: `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"resolve_precision: `precision`={precision!r}; choose from {', '.join(PRECISIONS)}"
        )
    if precision != "auto":
        return Precision(precision, "asked for")
    import tensorflow as tf

    if strategy is not None and isinstance(strategy, tf.distribute.TPUStrategy):
        return Precision("mixed_bfloat16", "TPUStrategy: TPUs compute in bfloat16")
    devices = _strategy_devices(strategy)
    on_gpu = devices is None or any("GPU" in d.upper() for d in devices)
    capabilities = _gpu_compute_capabilities(devices) if on_gpu else []
    if devices is not None and on_gpu and not capabilities:
        return Precision("float32", f"GPU devices {devices} not found among the visible GPUs")
    if capabilities:
        if None in capabilities:
            return Precision("float32", "a GPU's compute capability is unknown")
        if all(cc >= (7, 0) for cc in capabilities):
            return Precision(
                "mixed_float16",
                f"{len(capabilities)} GPU(s) with compute capability "
                f"{', '.join(f'{a}.{b}' for a, b in capabilities)} (tensor cores)",
            )
        return Precision(
            "float32", f"GPU compute capabilities {capabilities}: float16 needs >= 7.0"
        )
    found = sorted((cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS))
    if found:
        return Precision("mixed_bfloat16", f"CPU with {' and '.join(found)}")
    return Precision("float32", "no GPU with tensor cores, TPU or bfloat16 CPU instructions")


@contextlib.contextmanager
def precision_scope(policy: str | Precision):
    """Keras' global dtype policy set to `policy` inside the block (models built there take
    it), the previous one restored after, even on error."""
    import keras

    name = policy.policy if isinstance(policy, Precision) else policy
    if name == "auto" or name not in PRECISIONS:
        raise ValueError(
            f"precision_scope: `policy`={name!r}; pass a policy name "
            f"({', '.join(PRECISIONS[1:])}) or resolve_precision(...)"
        )
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(previous)
