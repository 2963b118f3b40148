"""A real S3-compatible server process for tests and demos: s3proxy (``org.gaul:s3proxy`` from
Maven Central) over a local directory.

:func:`resolve` fetches s3proxy and its dependencies once per machine with Maven
(``mvn dependency:copy-dependencies`` into ``~/.cache/dollyflow/s3proxy-<version>``, or
``$DOLLYFLOW_CACHE``); :class:`S3Server` runs it as its own JVM on a free loopback port with
generated credentials (AWS signature v2/v4, path-style buckets, plain HTTP), waits until it
answers, creates buckets, and stops it. Its log stays in its work directory.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

S3PROXY = "org.gaul:s3proxy"
S3PROXY_VERSION = "4.1.0"
#: s3proxy 4.x pulls Jackson 3, which needs jackson-annotations 2.20 or newer; Maven's nearest-wins
#: resolution would pick the older one an AWS SDK dependency names (the JVM then fails to start
#: with ClassNotFoundException: com.fasterxml.jackson.annotation.JsonSerializeAs).
PINNED = {"com.fasterxml.jackson.core:jackson-annotations": "2.22"}
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
_READY = "complete"


def cache_root() -> Path:
    return Path(os.environ.get("DOLLYFLOW_CACHE") or Path.home() / ".cache" / "dollyflow")


def _pom(version: str) -> str:
    def dep(coord: str, v: str) -> str:
        g, a = coord.split(":")
        return f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"

    group, artifact = S3PROXY.split(":")
    return ('<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            '<groupId>dollyflow</groupId><artifactId>s3proxy-runtime</artifactId><version>1</version>'
            '<packaging>pom</packaging><dependencyManagement><dependencies>'
            + "".join(dep(c, v) for c, v in PINNED.items())
            + f'</dependencies></dependencyManagement><dependencies>{dep(S3PROXY, version)}</dependencies></project>')


def resolve(version: str = S3PROXY_VERSION, timeout: float = 900) -> Path:
    """The directory of s3proxy's jars (``org.gaul:s3proxy:<version>`` and its runtime
    dependencies), resolved from Maven Central with ``mvn`` on first use and cached. Raises
    RuntimeError naming what failed (no mvn, no network: Maven's last lines)."""
    jars = cache_root() / f"s3proxy-{version}" / "jars"
    if (jars.parent / _READY).is_file():
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("s3proxy is not cached and Maven (mvn) is not installed to resolve it "
                           f"({S3PROXY}:{version}; cache: {jars.parent})")
    jars.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=jars.parent) as work:
        Path(work, "pom.xml").write_text(_pom(version))
        out = Path(work, "jars")
        proc = subprocess.run([mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={out}",
                               "-DincludeScope=runtime"], cwd=work, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not any(out.glob("s3proxy-*.jar")):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
            raise RuntimeError(f"mvn could not resolve {S3PROXY}:{version} (exit {proc.returncode}): " + " | ".join(tail))
        if jars.exists():
            shutil.rmtree(jars)
        out.rename(jars)
    (jars.parent / _READY).write_text(f"{S3PROXY}:{version}\n")
    return jars


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """s3proxy on ``127.0.0.1:<free port>`` storing objects under ``workdir/data``; its log is
    ``workdir/s3proxy.log``. ``endpoint`` is ``http://127.0.0.1:<port>``; ``access_key`` and
    ``secret_key`` are generated per server."""

    def __init__(self, workdir: str | Path, jars: Path | None = None):
        self.workdir = Path(workdir)
        self.jars = jars or resolve()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = "dolly" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(16)
        self.log = self.workdir / "s3proxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        props = self.workdir / "s3proxy.properties"
        props.write_text("\n".join([
            f"s3proxy.endpoint={self.endpoint}",
            "s3proxy.authorization=aws-v2-or-v4",
            f"s3proxy.identity={self.access_key}",
            f"s3proxy.credential={self.secret_key}",
            "jclouds.provider=filesystem-nio2",
            f"jclouds.filesystem.basedir={data}",
            ""]))
        java = shutil.which("java") or "java"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([java, "-Xmx256m", "-DLOG_LEVEL=warn", "-cp", f"{self.jars}/*",
                                          "org.gaul.s3proxy.Main", "--properties", str(props)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"s3proxy exited with {self.proc.returncode} at start; log: {self.log}: "
                                   + self.log.read_text(errors="replace")[-1500:])
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return self
            except urllib.error.HTTPError:   # 403 without a signature: it answers
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"s3proxy did not answer on {self.endpoint} within {START_TIMEOUT_S:.0f}s; log: {self.log}")

    def filesystem(self):
        """A pyarrow S3FileSystem on this server (creates buckets)."""
        import pyarrow.fs as pafs
        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                                 endpoint_override=self.endpoint, region=REGION, allow_bucket_creation=True)

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
