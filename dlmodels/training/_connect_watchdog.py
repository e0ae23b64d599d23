"""Watchdog process of `resolve_strategy(connect_timeout=...)`: standard library only.

Run as a script (not imported, so it starts without TensorFlow): `python _connect_watchdog.py
PID SECONDS FD`. It waits until the worker writes to (or closes) pipe FD, i.e. until its
`MultiWorkerMirroredStrategy` is built. If SECONDS pass first, it prints which peers of
`TF_CONFIG` accept no connection and SIGKILLs the worker: TensorFlow blocks in C++ (holding the
GIL) while it waits for the cluster, and catches SIGTERM, so nothing gentler can reach it.
"""

import contextlib
import json
import os
import select
import signal
import socket
import sys


def unreachable_peers(config):
    task = config.get("task", {})
    me = (task.get("type"), task.get("index", 0))
    missing = []
    for job, addresses in config.get("cluster", {}).items():
        for index, address in enumerate(addresses):
            if (job, index) == me:
                continue
            host, _, port = address.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    pass
            except OSError:
                missing.append(f"{job} {index} ({address})")
    return missing


def main(pid, seconds, fd):
    ready, _, _ = select.select([fd], [], [], seconds)
    if ready:
        return  # the strategy was built, or the worker is gone
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    missing = unreachable_peers(config) or ["none refused a connection; one did not join"]
    print(
        f"resolve_strategy: {task.get('type')} {task.get('index', 0)} waited {seconds:g} s for "
        f"the other workers of TF_CONFIG to join; not reachable: {', '.join(missing)}. Check "
        "the addresses in TF_CONFIG and that every worker started. Stopping this worker "
        "(SIGKILL).",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
