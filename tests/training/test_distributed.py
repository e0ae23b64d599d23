"""Multi-process training: equivalence with one device, a SIGKILLed worker resumed exactly,
atomic checkpoints, an unreachable peer, Ray Train. Each test starts TensorFlow processes."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlmodels.training import resolve_strategy
from dlmodels.training.launch import LocalCluster, WorkerFailed, free_ports, launch_local
from tests.training import dist_worker
from tests.training.mwms_worker import bn_model

pytestmark = pytest.mark.slow

TARGET = "tests.training.dist_worker:train"


def reference_run(strategy, initial):
    trainer = dist_worker.make_trainer(strategy, initial)
    trainer.fit(dist_worker.dataset(), epochs=dist_worker.EPOCHS)
    assert int(trainer.step.numpy()) == 20
    return dist_worker.results(trainer)


def assert_results_close(got, want, atol=1e-5):
    assert set(got) >= set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, atol=atol, err_msg=key)


def latest_step(directory):
    latest = tf.train.latest_checkpoint(directory)
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def test_worker_killed_mid_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """Global batch 16, 20 steps, BatchNorm, SGD with momentum, EMA. One device and
    MirroredStrategy over 2 logical CPUs agree; then 2 worker processes (MWMS): worker 1 is
    SIGKILLed mid-training, the launcher stops worker 0 and names worker 1; a relaunch (3
    steps per call) resumes from the chief's last checkpoint and both workers end with the
    one-device weights, BN statistics and EMA (within 1e-5), identical to each other. The
    chief's CSV log holds each epoch once, and every checkpoint the state file lists
    restores."""
    keras.utils.set_random_seed(0)
    initial = bn_model().get_weights()
    one = reference_run(tf.distribute.get_strategy(), initial)
    assert np.abs(one["moving_mean"]).max() > 0.05  # the statistics moved
    mirrored = reference_run(resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"]), initial)
    assert_results_close(mirrored, one)

    np.savez(tmp_path / "init.npz", **{f"w{i}": w for i, w in enumerate(initial)})
    ckpt = str(tmp_path / "ckpt")
    cluster = LocalCluster(2, TARGET, [str(tmp_path), "0.3"], stream=False).start()
    deadline = time.monotonic() + 240
    while latest_step(ckpt) < 6 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in cluster.processes), cluster.logs
        time.sleep(0.05)
    killed_after = latest_step(ckpt)
    assert 6 <= killed_after < 20, killed_after
    os.kill(cluster.processes[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerFailed, match="worker 1 was killed by signal SIGKILL") as failure:
        cluster.wait(timeout=120)
    assert failure.value.index == 1
    assert all(p.poll() is not None for p in cluster.processes)  # worker 0 was stopped too
    assert not (tmp_path / "worker0.npz").exists()
    resume_step = latest_step(ckpt)
    assert resume_step < 20

    # The relaunch runs 3 steps per tf.function call (chunks end on checkpoint steps).
    runs = launch_local(2, TARGET, [str(tmp_path), "0", "3"], stream=False, timeout=240)
    assert [r.returncode for r in runs] == [0, 0]
    results = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    for result in results:
        assert int(result["resumed_from"]) == resume_step >= 6
        assert_results_close(result, one)
    for key in one:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)

    with open(tmp_path / "logs" / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2"]
    state = tf.train.get_checkpoint_state(ckpt)
    assert state.model_checkpoint_path.endswith("ckpt-20")
    for path in state.all_model_checkpoint_paths:
        tf.train.load_checkpoint(path)  # complete: index and data present


def test_checkpoints_are_never_half_written(tmp_path):
    """A process saving 4 MB checkpoints back to back is SIGKILLed at random moments, 4 times:
    every time, the latest checkpoint restores completely and is consistent (the variable holds
    its own step number everywhere), and so does every older one still on disk. TensorFlow
    writes the data under a temporary name, renames it, and only then rewrites the state file,
    itself by an atomic rename."""
    rng = random.Random(0)
    directory = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    script = [sys.executable, "-m", "tests.training.dist_worker", "save_forever", directory]
    seen, stale = [], []
    for _ in range(4):
        start = latest_step(directory)
        with open(tmp_path / "log.txt", "wb") as log:
            proc = subprocess.Popen(script, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while latest_step(directory) < start + 3 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        state = tf.train.get_checkpoint_state(directory)
        assert state.model_checkpoint_path == state.all_model_checkpoint_paths[-1]
        for path in state.all_model_checkpoint_paths:
            try:
                reader = tf.train.load_checkpoint(path)
                step = reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
                big = reader.get_tensor("big/.ATTRIBUTES/VARIABLE_VALUE")
            except (tf.errors.NotFoundError, tf.errors.DataLossError):
                # CheckpointManager records a new checkpoint *before* deleting the oldest, so
                # a kill mid-sweep can leave an older entry naming deleted files; never the
                # latest, which is the one Trainer.restore reads.
                assert path != state.model_checkpoint_path
                stale.append(path)
                continue
            assert big.shape == (1_000_000,) and (big == step).all()
        seen.append(latest_step(directory))
    assert seen == sorted(seen) and seen[0] >= 3


def test_preemption_signal_saves_the_step_and_resume_is_exact(tmp_path):
    """SIGTERM during epoch 2 of a run with epoch-end checkpoints only: the
    PreemptionCheckpointHandler saves at the current step and exits with 42; resuming from that
    mid-epoch checkpoint ends with the uninterrupted weights, BN statistics and EMA."""
    keras.utils.set_random_seed(0)
    initial = bn_model().get_weights()
    one = reference_run(tf.distribute.get_strategy(), initial)
    np.savez(tmp_path / "init.npz", **{f"w{i}": w for i, w in enumerate(initial)})
    ckpt = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TF_CONFIG", None)
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.training.dist_worker", "preemptible", str(tmp_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while latest_step(ckpt) < 10 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 42, (tmp_path / "log.txt").read_text()[-2000:]
    preempted_at = latest_step(ckpt)
    assert 10 < preempted_at < 20  # saved mid-epoch by the handler, not at an epoch end
    trainer = dist_worker.make_trainer(
        tf.distribute.get_strategy(), bn_model().get_weights(), checkpoint_dir=ckpt
    )
    assert trainer.restore() == 1 and int(trainer.step.numpy()) == preempted_at
    trainer.fit(dist_worker.dataset(), epochs=dist_worker.EPOCHS)
    assert_results_close(dist_worker.results(trainer), one, atol=1e-6)


def test_unreachable_worker_fails_within_the_timeout(tmp_path):
    """TF_CONFIG names a second worker that never starts: TensorFlow would wait forever; with
    connect_timeout=5 a watchdog names the missing peer and kills the worker."""
    ports = free_ports(2)
    config = {
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": 0},
    }
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CONFIG": json.dumps(config)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.training.dist_worker", "wait_for_peers", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"not reachable: worker 1 (127.0.0.1:{ports[1]})" in proc.stderr
    assert "all workers joined" not in proc.stdout


def test_ray_train_two_workers_match_one_device(tmp_path):
    """The same training function on 2 Ray Train workers (TensorflowTrainer sets TF_CONFIG)."""
    pytest.importorskip("ray.train.tensorflow")
    import ray

    from dlmodels.training.launch import ray_train

    keras.utils.set_random_seed(0)
    initial = bn_model().get_weights()
    one = reference_run(tf.distribute.get_strategy(), initial)
    np.savez(tmp_path / "init.npz", **{f"w{i}": w for i, w in enumerate(initial)})
    try:
        result = ray_train(
            dist_worker.ray_loop,
            2,
            config={"work_dir": str(tmp_path)},
            storage_path=tmp_path / "ray",
            num_cpus=2,
        )
    finally:
        ray.shutdown()
    assert result.error is None
    results = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    for result in results:
        assert_results_close(result, one)


def test_vae_and_cgan_two_workers_match_one_device_and_mirrored(tmp_path):
    """The registry's VAE and conditional GAN (batch norm in G and D), global batch 16, 20 SGD
    steps each: one pair of MultiWorkerMirroredStrategy worker processes trains both, one after
    the other; both workers end bit-identical, and equal (within 1e-5) to one device and to
    MirroredStrategy over 2 logical CPUs. Exactness needs every loss averaged over the global
    batch and each replica's rows of the global-batch noise (reparameterisation epsilon, GAN
    latents): with the noise not split per replica, or a local-batch average, the weights
    differ by far more than 1e-5 (checked by mutating StepContext)."""
    keras.utils.set_random_seed(0)
    vae, cgan = dist_worker.vae_model(), dist_worker.cgan_model()
    vae_initial, cgan_initial = vae.get_weights(), cgan.get_weights()
    for name, weights in (("vae", vae_initial), ("cgan", cgan_initial)):
        np.savez(tmp_path / f"{name}_init.npz", **{f"w{i}": w for i, w in enumerate(weights)})
    # The workers start (TensorFlow import, cluster connection) while the references train.
    cluster = LocalCluster(
        2, "tests.training.dist_worker:generative", [str(tmp_path)], stream=False
    ).start()
    try:
        one = dist_worker.train_generative(tf.distribute.get_strategy(), vae_initial, cgan_initial)
        mirrored = dist_worker.train_generative(
            resolve_strategy("mirrored", devices=["/cpu:0", "/cpu:1"]), vae_initial, cgan_initial
        )
        runs = cluster.wait(timeout=240)
    finally:
        cluster.stop()
    assert [r.returncode for r in runs] == [0, 0]
    workers = [dict(np.load(tmp_path / f"generative{i}.npz")) for i in range(2)]
    initial = {
        **{f"vae_w{i}": w for i, w in enumerate(vae_initial)},
        **{f"gen_w{i}": w for i, w in enumerate(cgan.generator.get_weights())},
        **{f"disc_w{i}": w for i, w in enumerate(cgan.discriminator.get_weights())},
    }
    assert set(initial) == {k for k in one if "_w" in k}
    # Every model trained: its weights moved far beyond the tolerance.
    for part in ("vae", "gen", "disc"):
        assert (
            max(np.abs(one[k] - w).max() for k, w in initial.items() if k.startswith(part)) > 1e-2
        )
    for result in workers:
        assert_results_close(result, one)
    for key in one:
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
    assert_results_close(mirrored, one)


def test_sigterm_to_one_of_two_workers_saves_both_at_one_step_and_resume_is_exact(tmp_path):
    """2 MWMS workers, epoch-end checkpoints only, preemption on: SIGTERM to worker 1 during
    epoch 2 makes both workers save at the same step (the PreemptionCheckpointHandler agrees on
    it through the coordination service) and exit with 42; a relaunch resumes from that
    mid-epoch checkpoint and both workers end with the uninterrupted one-device weights, BN
    statistics and EMA."""
    keras.utils.set_random_seed(0)
    initial = bn_model().get_weights()
    np.savez(tmp_path / "init.npz", **{f"w{i}": w for i, w in enumerate(initial)})
    ckpt = str(tmp_path / "ckpt")
    cluster = LocalCluster(
        2, "tests.training.dist_worker:preemptible_worker", [str(tmp_path)], stream=False
    ).start()
    try:
        one = reference_run(tf.distribute.get_strategy(), initial)  # while the workers start
        deadline = time.monotonic() + 180
        while latest_step(ckpt) < 10 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in cluster.processes), cluster.logs
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(cluster.processes[1].pid, signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in cluster.processes]
    finally:
        cluster.stop()
    cluster._join()
    assert codes == [42, 42], [list(log)[-20:] for log in cluster.logs]
    preempted_at = latest_step(ckpt)
    assert 10 < preempted_at < 20  # saved mid-epoch by the handler, not at an epoch end
    for log in cluster.logs:
        assert f"preempted at step {preempted_at}" in log, list(log)[-20:]

    runs = launch_local(2, TARGET, [str(tmp_path)], stream=False, timeout=240)
    assert [r.returncode for r in runs] == [0, 0]
    results = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    for result in results:
        assert int(result["resumed_from"]) == preempted_at
        assert_results_close(result, one)
    for key in one:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
