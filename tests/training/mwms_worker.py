"""One worker of the multi-worker test: `python mwms_worker.py TF_CONFIG_JSON OUT_NPZ CKPT_DIR`.

Started as a plain subprocess (multi_process_runner needs Bazel). Trains `bn_model` with
`resolve_strategy("auto")`, which must pick MultiWorkerMirroredStrategy from TF_CONFIG, and
saves its weights, its BatchNorm moving statistics and its validation loss.
"""

import os
import sys

import keras
import numpy as np

SIZE = 16


def bn_model():
    """Conv -> BatchNorm -> ReLU -> 1x1 classifier (the test builds the same one-device model)."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.5, name="bn")(x))
    return keras.Model(inp, keras.layers.Conv2D(4, 1)(x))


def datasets():
    from dlmodels.data import shapes

    train = shapes.dataset("train", batch_size=8, image_size=SIZE, num_samples=16, shuffle=False)
    val = shapes.dataset("validation", batch_size=8, image_size=SIZE, num_samples=8)
    return train, val


def main():
    os.environ["TF_CONFIG"] = sys.argv[1]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf

    from dlmodels.training import Trainer, resolve_strategy

    out, ckpt = sys.argv[2], sys.argv[3]
    initial = np.load(out.replace(".npz", "_init.npz")) if len(sys.argv) > 4 else None
    strategy = resolve_strategy("auto", communication_timeout=60)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    with strategy.scope():
        model = bn_model()
        if initial is not None:
            model.set_weights([initial[f"w{i}"] for i in range(len(initial.files))])
        sgd = keras.optimizers.SGD(0.5)
    train, val = datasets()
    trainer = Trainer(
        model, optimizer=sgd, strategy=strategy, checkpoint_dir=ckpt, max_checkpoints=1
    )
    assert trainer.sync_batch_norm  # "auto" with 2 replicas (one per worker)
    history = trainer.fit(train, epochs=2)
    bn = model.get_layer("bn")
    np.savez(
        out,
        *model.get_weights(),
        loss=np.array(history["loss"]),
        moving_mean=np.asarray(bn.moving_mean),
        moving_variance=np.asarray(bn.moving_variance),
        val_loss=np.array(trainer.evaluate(val)["loss"]),
    )


if __name__ == "__main__":
    main()
