"""One train job per output directory at a time: a lease file beside it (engine-free).

``<parent>/.<name>.lease.json`` holds the run id, host, process id, when it was taken and a
heartbeat the holder renews every :data:`HEARTBEAT_SECONDS` from a daemon thread. A second job
for the same output directory fails at once, naming the run and host that hold it. A lease
whose heartbeat is older than :data:`STALE_SECONDS` (its driver died: a preempted node, a killed
process) is taken over: renamed aside (only one of several racing takers can rename it) and
created anew with an exclusive create. The lease lives beside the directory, not in it, because
a retrain with ``train.overwrite=true`` swaps the directory itself.

Exclusive create and rename are atomic on local disks and NFS; on FUSE mounts of object stores
(``/Volumes``, ``/dbfs``) they are as good as the mount makes them.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from dollyflow.core.storage import write_atomic

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


class OutputLocked(RuntimeError):
    """Another train run holds the output directory."""


def lease_path(output_dir: str) -> str:
    parent, name = os.path.split(os.path.normpath(os.path.abspath(output_dir)))
    return os.path.join(parent, f".{name}.lease.json")


def read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Lease:
    """Held while the block runs (``with Lease(out, run_id): ...``) or between :meth:`acquire`
    and :meth:`release`."""

    def __init__(self, output_dir: str, run_id: str, *, stale_seconds: float = STALE_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.output_dir = os.path.abspath(output_dir)
        self.path = lease_path(output_dir)
        self.run_id = run_id
        self.token = uuid.uuid4().hex
        self.stale_seconds = float(stale_seconds)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.taken_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> dict:
        now = time.time()
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "output_dir": self.output_dir, "taken_at": getattr(self, "_taken_at", now), "heartbeat": now}

    def _create(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self._taken_at = time.time()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._doc(), f)
        return True

    def acquire(self) -> "Lease":
        for _ in range(3):
            if self._create():
                break
            held = read(self.path)
            if held is None:            # being written this instant, or just removed
                time.sleep(0.2)
                held = read(self.path)
                if held is None:
                    continue
            age = time.time() - float(held.get("heartbeat", 0))
            if age <= self.stale_seconds:
                raise OutputLocked(
                    f"train.output_dir {self.output_dir} is in use by run {held.get('run_id')!r} on host "
                    f"{held.get('host')} (pid {held.get('pid')}; its heartbeat is {age:.0f} s old, lease "
                    f"{self.path}). Two train jobs must not share an output directory: wait for it, or choose "
                    f"another train.output_dir. A lease without a heartbeat for {self.stale_seconds:.0f} s is "
                    "taken over")
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, aside)      # only one racing taker wins this rename
            except FileNotFoundError:
                continue
            try:
                os.remove(aside)
            except OSError:
                pass
            self.taken_over = held
        else:
            raise OutputLocked(f"could not take the lease {self.path} (other jobs keep taking it)")
        self._thread = threading.Thread(target=self._beat, name="dollyflow-lease", daemon=True)
        self._thread.start()
        return self

    def holds(self) -> bool:
        held = read(self.path)
        return bool(held) and held.get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self.holds():        # taken over after we went quiet: never write over theirs
                return
            try:
                write_atomic(self.path, json.dumps(self._doc()).encode("utf-8"))
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holds():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
