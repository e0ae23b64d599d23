"""One worker of the multi-worker test: `python mwms_worker.py TF_CONFIG_JSON OUT_NPZ CKPT_DIR`.

Started as a plain subprocess (multi_process_runner needs Bazel). Trains the tiny model with
`resolve_strategy("auto")`, which must pick MultiWorkerMirroredStrategy from TF_CONFIG.
"""

import os
import sys

os.environ["TF_CONFIG"] = sys.argv[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras
import numpy as np
import tensorflow as tf

from dlmodels.data import shapes
from dlmodels.training import Trainer, resolve_strategy


def tiny_model():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    return keras.Model(inp, keras.layers.Conv2D(4, 1)(x))


def main():
    out, ckpt = sys.argv[2], sys.argv[3]
    initial = np.load(out.replace(".npz", "_init.npz")) if len(sys.argv) > 4 else None
    strategy = resolve_strategy("auto", communication_timeout=60)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    with strategy.scope():
        model = tiny_model()
        if initial is not None:
            model.set_weights([initial[f"w{i}"] for i in range(len(initial.files))])
        sgd = keras.optimizers.SGD(0.5)
    train = shapes.dataset("train", batch_size=8, image_size=16, num_samples=16, shuffle=False)
    history = Trainer(
        model, optimizer=sgd, strategy=strategy, checkpoint_dir=ckpt, max_checkpoints=1
    ).fit(train, epochs=2)
    np.savez(out, *model.get_weights(), loss=np.array(history["loss"]))


if __name__ == "__main__":
    main()
