"""Worker functions of the multi-process tests, started by `dlmodels.training.launch` (or Ray).

`train` is one worker of a 2-worker MultiWorkerMirroredStrategy job (TF_CONFIG from the
launcher): a model with BatchNorm, global batch 16, 2 epochs of 10 steps, SGD with momentum,
an EMA of the weights, a checkpoint every 3 steps. It resumes from the checkpoint directory
when one exists and saves its weights, BN statistics, EMA and the step it resumed from.

`generative` is one worker of a 2-worker job that trains the registry's VAE and then its
conditional GAN (tiny configs, global batch 16, 20 steps each) under one
MultiWorkerMirroredStrategy, and saves both models' weights and losses.
"""

import os
import sys
import time

import numpy as np

GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 10
EPOCHS = 2
SIZE = 16


def arrays():
    rng = np.random.default_rng(7)
    n = GLOBAL_BATCH * STEPS_PER_EPOCH
    x = rng.normal(size=(n, SIZE, SIZE, 3)).astype("float32")
    x[n // 2 :] = 2.0 * x[n // 2 :] + 1.0  # different statistics per half: BN must sync
    y = rng.integers(0, 4, size=(n, SIZE, SIZE)).astype("int32")
    return x, y


def dataset(slow=0.0):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(arrays()).batch(GLOBAL_BATCH)
    if slow:
        # Slow input only (values unchanged), so a test can kill a worker mid-training.
        def pause(x, y):
            time.sleep(slow)
            return x, y

        ds = ds.map(lambda x, y: tf.py_function(pause, [x, y], [tf.float32, tf.int32]))
        ds = ds.map(
            lambda x, y: (
                tf.ensure_shape(x, [None, SIZE, SIZE, 3]),
                tf.ensure_shape(y, [None, SIZE, SIZE]),
            )
        )
    return ds


def make_trainer(
    strategy,
    initial,
    checkpoint_dir=None,
    log_dir=None,
    steps_per_execution=1,
    checkpoint_every=3,
    preemption=False,
):
    import keras

    from dlmodels.training import Trainer
    from tests.training.mwms_worker import bn_model

    with strategy.scope():
        model = bn_model()
        model.set_weights(initial)
        sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    return Trainer(
        model,
        optimizer=sgd,
        strategy=strategy,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        max_checkpoints=2,
        preemption=preemption,
        ema_decay=0.9,
        log_dir=log_dir,
        steps_per_execution=steps_per_execution,
        progress=False,
    )


def results(trainer):
    bn = trainer.model.get_layer("bn")
    return {
        **{f"w{i}": w for i, w in enumerate(trainer.model.get_weights())},
        **{f"ema{i}": np.asarray(a) for i, a in enumerate(trainer.ema.averages)},
        "moving_mean": np.asarray(bn.moving_mean),
        "moving_variance": np.asarray(bn.moving_variance),
    }


def train(work_dir, slow="0", steps_per_execution="1"):
    """One worker: resolve the strategy from TF_CONFIG, (resume and) train, save results."""
    import json

    import tensorflow as tf

    from dlmodels.training import resolve_strategy

    strategy = resolve_strategy("auto", communication_timeout=60)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    init = np.load(os.path.join(work_dir, "init.npz"))
    trainer = make_trainer(
        strategy,
        [init[f"w{i}"] for i in range(len(init.files))],
        checkpoint_dir=os.path.join(work_dir, "ckpt"),
        log_dir=os.path.join(work_dir, "logs"),
        steps_per_execution=int(steps_per_execution),
    )
    trainer.restore()
    resumed_from = int(trainer.step.numpy())
    print(f"starting at step {resumed_from}", flush=True)
    trainer.fit(dataset(float(slow)), epochs=EPOCHS)
    np.savez(
        os.path.join(work_dir, f"worker{index}.npz"),
        resumed_from=resumed_from,
        **results(trainer),
    )


def preemptible(work_dir):
    """One process, default strategy, slow input, no periodic checkpoints, preemption on: a
    SIGTERM makes the Trainer save at the current step and exit (status 42)."""
    import tensorflow as tf

    init = np.load(os.path.join(work_dir, "init.npz"))
    trainer = make_trainer(
        tf.distribute.get_strategy(),
        [init[f"w{i}"] for i in range(len(init.files))],
        checkpoint_dir=os.path.join(work_dir, "ckpt"),
        checkpoint_every=None,
        preemption=True,
    )
    trainer.fit(dataset(0.2), epochs=EPOCHS)
    print("finished without preemption", flush=True)


def preemptible_worker(work_dir):
    """One of 2 MWMS workers: slow input, epoch-end checkpoints only, preemption on. A SIGTERM
    to any worker makes both save at one agreed step and exit (status 42); each prints the
    step it stopped at."""
    import tensorflow as tf

    from dlmodels.training import resolve_strategy

    strategy = resolve_strategy("auto", communication_timeout=60)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    init = np.load(os.path.join(work_dir, "init.npz"))
    trainer = make_trainer(
        strategy,
        [init[f"w{i}"] for i in range(len(init.files))],
        checkpoint_dir=os.path.join(work_dir, "ckpt"),
        checkpoint_every=None,
        preemption=True,
    )
    try:
        trainer.fit(dataset(0.2), epochs=EPOCHS)
    except SystemExit:
        print(f"preempted at step {int(trainer.step.numpy())}", flush=True)
        raise
    print("finished without preemption", flush=True)


def echo_tf_config(tag):
    """Print the tag, this worker's index and the cluster (the launcher test's target)."""
    import json

    config = json.loads(os.environ["TF_CONFIG"])
    print(f"{tag} {config['task']['index']} {json.dumps(config['cluster'])}")


def wait_for_peers(seconds):
    """Only build the strategy (a test points TF_CONFIG at a worker that never starts)."""
    from dlmodels.training import resolve_strategy

    resolve_strategy("auto", connect_timeout=float(seconds))
    print("all workers joined", flush=True)


def save_forever(directory):
    """Save checkpoints of a 4 MB variable filled with the step number, as fast as possible,
    until killed (the atomicity test kills it at random moments)."""
    import tensorflow as tf

    step = tf.Variable(0, dtype=tf.int64)
    big = tf.Variable(tf.zeros([1_000_000]))
    checkpoint = tf.train.Checkpoint(step=step, big=big)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
    while True:
        step.assign_add(1)
        big.assign(tf.fill([1_000_000], tf.cast(step, tf.float32)))
        manager.save(checkpoint_number=int(step))


# -- generative models (VAE, cGAN) -----------------------------------------------------------
GEN_SIZE = 8
GEN_CLASSES = 3


def generative_arrays():
    """160 images in [0, 1] (8x8x1) and class ids: 2 epochs of 10 global batches of 16."""
    rng = np.random.default_rng(11)
    n = GLOBAL_BATCH * STEPS_PER_EPOCH
    x = rng.uniform(size=(n, GEN_SIZE, GEN_SIZE, 1)).astype("float32")
    y = (np.arange(n) % GEN_CLASSES).astype("int32")
    return x, y


def generative_dataset():
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(generative_arrays()).batch(GLOBAL_BATCH)


def vae_model():
    """The registry's VAE, tiny: dense, one hidden layer of 16, latent 2."""
    from dlmodels.models import VAE

    return VAE(input_shape=(GEN_SIZE, GEN_SIZE, 1), latent_dim=2, hidden_units=(16,), seed=3)


def cgan_model():
    """The registry's conditional GAN, tiny: filters (8, 4) (batch norm in G and D), 3 classes."""
    from dlmodels.models import ConditionalGAN

    return ConditionalGAN(
        input_shape=(GEN_SIZE, GEN_SIZE, 1),
        num_classes=GEN_CLASSES,
        latent_dim=4,
        embedding_dim=2,
        filters=(8, 4),
        seed=5,
    )


def train_generative(strategy, vae_initial, cgan_initial):
    """Train the VAE, then the cGAN, from the given weights under `strategy` (global batch 16,
    2 epochs of 10 steps, SGD with momentum); return both models' weights and loss histories."""
    import keras

    from dlmodels.training import Trainer

    with strategy.scope():
        vae = vae_model()
        vae.set_weights(vae_initial)
        sgd = keras.optimizers.SGD(0.05, momentum=0.5)
    trainer = Trainer(vae.task(optimizer=sgd), strategy=strategy, progress=False)
    vae_history = trainer.fit(generative_dataset(), epochs=EPOCHS)
    assert int(trainer.step.numpy()) == EPOCHS * STEPS_PER_EPOCH
    with strategy.scope():
        cgan = cgan_model()
        cgan.set_weights(cgan_initial)
        g_opt = keras.optimizers.SGD(0.05, momentum=0.5)
        d_opt = keras.optimizers.SGD(0.05, momentum=0.5)
    trainer = Trainer(cgan.task(g_opt, d_opt), strategy=strategy, progress=False)
    gan_history = trainer.fit(generative_dataset(), epochs=EPOCHS)
    assert int(trainer.step.numpy()) == EPOCHS * STEPS_PER_EPOCH
    return {
        **{f"vae_w{i}": w for i, w in enumerate(vae.get_weights())},
        **{f"gen_w{i}": w for i, w in enumerate(cgan.generator.get_weights())},
        **{f"disc_w{i}": w for i, w in enumerate(cgan.discriminator.get_weights())},
        "vae_loss": np.array(vae_history["loss"]),
        "d_loss": np.array(gan_history["d_loss"]),
        "g_loss": np.array(gan_history["g_loss"]),
    }


def load_weights(path):
    data = np.load(path)
    return [data[f"w{i}"] for i in range(len(data.files))]


def generative(work_dir):
    """One worker: VAE then cGAN under one MWMS strategy from TF_CONFIG; saves the results."""
    import json

    import tensorflow as tf

    from dlmodels.training import resolve_strategy

    strategy = resolve_strategy("auto", communication_timeout=60)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    assert strategy.num_replicas_in_sync == 2
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    got = train_generative(
        strategy,
        load_weights(os.path.join(work_dir, "vae_init.npz")),
        load_weights(os.path.join(work_dir, "cgan_init.npz")),
    )
    np.savez(os.path.join(work_dir, f"generative{index}.npz"), **got)


def ray_loop(config):
    """Ray Train's per-worker function: Ray sets TF_CONFIG; the same training as `train`."""
    from ray import train as ray_train

    train(config["work_dir"])
    ray_train.report({"done": 1})


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
