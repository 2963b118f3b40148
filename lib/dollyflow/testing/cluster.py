"""A Spark standalone cluster on this machine, for tests (no pyspark import, no downloads).

:class:`StandaloneCluster` starts pyspark's own ``spark-class`` daemons: one master
(``org.apache.spark.deploy.master.Master``) and ``workers`` workers
(``org.apache.spark.deploy.worker.Worker``), each its own JVM in its own process group, bound to
127.0.0.1 on free ports, each worker with its own work directory, ``cores`` cores and
``memory`` of executor memory. :meth:`start` waits until the master's JSON status
(``http://127.0.0.1:<webui>/json``) lists every worker ALIVE; :meth:`stop` kills the process
groups (executors included: a worker starts them in its group). Each daemon's output goes to its
own log file under ``root/logs``; :meth:`log_tail` gives the last lines of each, for a failure
message.

    with StandaloneCluster(tmp_dir, workers=2) as cluster:
        subprocess.run([spark_submit, "--master", cluster.url, ...], env=cluster.submit_env())
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


class ClusterError(RuntimeError):
    """The cluster did not come up; the message ends with the daemons' log tails."""


def spark_home() -> Path:
    """The pyspark package directory: a Spark distribution (bin/spark-class, jars/)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError("pyspark is not installed: no Spark to start a cluster with")
    return Path(list(spec.submodule_search_locations)[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandaloneCluster:
    """A master and ``workers`` workers on 127.0.0.1 (see the module docstring)."""

    def __init__(self, root: str | Path, *, workers: int = 2, cores: int = 1, memory: str = "2g",
                 daemon_memory: str = "256m", python: str = sys.executable, pythonpath: str = "",
                 start_timeout: float = 120.0):
        self.root = Path(root)
        self.workers, self.cores, self.memory = workers, cores, memory
        self.daemon_memory = daemon_memory
        self.python, self.pythonpath = python, pythonpath
        self.start_timeout = start_timeout
        self.home = spark_home()
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.url = ""
        self.webui = 0

    # ---- the daemons' environment
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_MASTER_HOST", "SPARK_CONF_DIR"):
            env.pop(k, None)
        conf_dir = self.root / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        env.update(SPARK_HOME=str(self.home), SPARK_LOCAL_IP="127.0.0.1", SPARK_CONF_DIR=str(conf_dir),
                   SPARK_DAEMON_MEMORY=self.daemon_memory, SPARK_NO_DAEMONIZE="1",
                   PYSPARK_PYTHON=self.python)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in [self.pythonpath, env.get("PYTHONPATH", "")] if p)
        return env

    def submit_env(self) -> dict[str, str]:
        """The environment for ``spark-submit`` against this cluster: driver and executors run
        :attr:`python` with :attr:`pythonpath` first on their path."""
        env = self._env()
        env.pop("SPARK_NO_DAEMONIZE", None)
        env["PYSPARK_DRIVER_PYTHON"] = self.python
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(self.home / "bin" / "spark-class"), *args], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(),
                                    cwd=str(self.root), start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    # ---- start, status, stop
    def status(self) -> dict:
        """The master's JSON status (workers, their state, applications)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui}/json", timeout=5) as r:
            return json.loads(r.read())

    def alive_workers(self) -> list[dict]:
        try:
            return [w for w in self.status().get("workers", []) if w.get("state") == "ALIVE"]
        except OSError:
            return []

    def start(self) -> "StandaloneCluster":
        port, self.webui = free_port(), free_port()
        self._spawn("master", [MASTER_CLASS, "--host", "127.0.0.1", "--port", str(port),
                               "--webui-port", str(self.webui)])
        self.url = f"spark://127.0.0.1:{port}"
        for i in range(self.workers):
            work = self.root / f"worker-{i}"
            work.mkdir(parents=True, exist_ok=True)
            self._spawn(f"worker-{i}", [WORKER_CLASS, "--host", "127.0.0.1", "--port", "0",
                                        "--webui-port", str(free_port()), "--cores", str(self.cores),
                                        "--memory", self.memory, "--work-dir", str(work), self.url])
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            dead = [(n, p.returncode) for n, p, _ in self.procs if p.poll() is not None]
            if dead:
                self.stop()
                raise ClusterError(f"{', '.join(f'{n} exited with {rc}' for n, rc in dead)} while the cluster "
                                   f"started\n{self.log_tail()}")
            if len(self.alive_workers()) == self.workers:
                return self
            time.sleep(0.5)
        self.stop()
        raise ClusterError(f"{self.workers} workers did not register with {self.url} within "
                           f"{self.start_timeout:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill every daemon's process group (a worker's executors are in its group), then wait."""
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def log_paths(self) -> list[Path]:
        """The daemons' logs and every executor's stdout/stderr under the workers' work dirs."""
        paths = [log for _, _, log in self.procs]
        paths += sorted(self.root.glob("worker-*/app-*/*/std*"))
        return paths

    def log_tail(self, lines: int = 25) -> str:
        out = []
        for path in self.log_paths():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
