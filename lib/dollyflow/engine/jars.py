"""The JVM packages of the local session dollyflow starts: Delta Lake's jars, resolved from Maven
Central by Spark's own Ivy (``spark.jars.packages``) the way ``configure_spark_with_delta_pip``
does, into the Ivy cache under the user's home, so once per machine.

``spark.delta_packages`` decides: ``auto`` (the default) picks the coordinate matching the
installed delta-spark (:func:`delta_coordinate`); ``off`` starts without Delta; anything else is
used as the Maven coordinates. Resolution must never hang a start: an ``auto`` coordinate is used
when its jar is already in the Ivy cache (no network needed), else only after Maven Central
answered a short request for its POM (:data:`PROBE_TIMEOUT_S`); when it cannot be had,
:func:`plan_packages` says why and the session starts without Delta (``tables.backend=auto`` then
uses delta-rs and reports that reason).
"""
from __future__ import annotations

import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
SCALA = "2.13"
#: Seconds one request to Maven Central may take before it counts as unreachable.
PROBE_TIMEOUT_S = 8.0
#: Session settings that make Delta's SQL (MERGE, DESCRIBE HISTORY, path tables) work.
DELTA_SQL_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


@dataclass
class Packages:
    """What a local session adds: Maven coordinates for ``spark.jars.packages`` (empty: none), the
    Spark settings that go with them, whether they must be downloaded first, and why."""
    coordinates: list[str]
    conf: dict[str, str]
    download: bool
    reason: str


def ivy_dir(conf: dict[str, str]) -> Path:
    """Spark's Ivy directory: ``spark.jars.ivy`` when set, else Spark 4's default ``~/.ivy2.5.2``."""
    return Path(conf.get("spark.jars.ivy") or Path.home() / ".ivy2.5.2").expanduser()


def cached_jar(coordinate: str, conf: dict[str, str]) -> Path | None:
    """The jar Spark's Ivy retrieved for ``coordinate`` earlier (``<ivy>/jars/group_artifact-version.jar``)."""
    group, artifact, version = coordinate.split(":")
    jar = ivy_dir(conf) / "jars" / f"{group}_{artifact}-{version}.jar"
    return jar if jar.is_file() else None


def delta_candidates() -> tuple[str, list[str]]:
    """(artifact, versions to try): ``io.delta:delta-spark_<spark major.minor>_2.13`` as delta-spark's
    own ``configure_spark_with_delta_pip`` names it, first at the installed delta-spark's version,
    then at the earlier patches of its minor version (a Python-only patch release has no jar of its
    own; the JVM API of one minor version is the same)."""
    import pyspark

    spark_mm = ".".join(pyspark.__version__.split(".")[:2])
    version = metadata.version("delta_spark")
    parts = version.split(".")
    versions = [version]
    if len(parts) == 3 and parts[2].isdigit():
        versions += [f"{parts[0]}.{parts[1]}.{p}" for p in range(int(parts[2]) - 1, -1, -1)]
    return f"io.delta:delta-spark_{spark_mm}_{SCALA}", versions


def maven_has(coordinate: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether Maven Central publishes ``coordinate`` (a HEAD request for its POM): True, False
    (404), or raises OSError when Maven Central cannot be reached in ``timeout`` seconds."""
    group, artifact, version = coordinate.split(":")
    url = f"{MAVEN_CENTRAL}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.pom"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
            return 200 <= r.status < 300
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise OSError(f"{url}: HTTP {exc.code}") from exc


def delta_coordinate(conf: dict[str, str]) -> tuple[str | None, bool, str]:
    """(coordinate or None, download needed, why) for ``spark.delta_packages=auto``."""
    try:
        artifact, versions = delta_candidates()
    except metadata.PackageNotFoundError:
        return None, False, "the delta-spark Python package is not installed"
    for v in versions:
        if cached_jar(f"{artifact}:{v}", conf):
            return f"{artifact}:{v}", False, f"{artifact}:{v} from the Ivy cache ({ivy_dir(conf)})"
    for v in versions:
        coordinate = f"{artifact}:{v}"
        try:
            if maven_has(coordinate):
                return coordinate, True, f"{coordinate} from Maven Central (first use: downloaded into {ivy_dir(conf)})"
        except OSError as exc:
            return None, False, (f"{coordinate} is not in the Ivy cache ({ivy_dir(conf)}) and Maven Central cannot be "
                                 f"reached ({type(exc).__name__}: {str(exc)[:160]})")
    return None, False, (f"Maven Central publishes none of {', '.join(f'{artifact}:{v}' for v in versions)} "
                         "(set spark.delta_packages to a published coordinate)")


def plan_packages(setting: str, conf: dict[str, str]) -> Packages:
    """The Delta packages a local session with ``spark.delta_packages=setting`` and the user's
    ``spark.conf`` (``conf``) starts with: nothing when ``off`` or not obtainable, with the reason."""
    if setting == "off":
        return Packages([], {}, False, "spark.delta_packages=off")
    if setting == "auto":
        coordinate, download, why = delta_coordinate(conf)
        if coordinate is None:
            return Packages([], {}, False, f"spark.delta_packages=auto: {why}")
        coords, reason = [coordinate], f"spark.delta_packages=auto: {why}"
    else:
        coords = [c.strip() for c in setting.split(",") if c.strip()]
        download = not all(cached_jar(c, conf) for c in coords)
        reason = f"spark.delta_packages={setting}"
    extra = {}
    for key, value in DELTA_SQL_CONF.items():
        mine = [v.strip() for v in conf.get(key, "").split(",") if v.strip()]
        if key == "spark.sql.extensions":
            extra[key] = ",".join(mine + ([value] if value not in mine else []))
        elif not mine:          # a catalog the user set stays theirs
            extra[key] = value
    return Packages(coords, extra, download, reason)


def merged_packages(conf: dict[str, str], packages: Packages) -> str:
    """``spark.jars.packages``: the user's own packages, then ours."""
    mine = [p.strip() for p in conf.get("spark.jars.packages", "").split(",") if p.strip()]
    return ",".join(mine + [c for c in packages.coordinates if c not in mine])


def announce(packages: Packages, conf: dict[str, str]) -> None:
    """One line on stderr before a first resolution downloads (it can take a minute or two)."""
    if packages.download:
        print(f"dollyflow: resolving {', '.join(packages.coordinates)} from Maven Central into {ivy_dir(conf)} "
              "(first use on this machine: about 90 MB, once; later sessions start from the cache)",
              file=sys.stderr, flush=True)


def bundled_hadoop_version() -> str | None:
    """The Hadoop version of pyspark's own jars (``hadoop-client-api-<version>.jar``); None when
    pyspark ships none (a pyspark without Hadoop)."""
    import pyspark

    for jar in sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar")):
        return jar.name[len("hadoop-client-api-"):-len(".jar")]
    return None


def hadoop_aws_packages(setting: str, needed: bool) -> tuple[list[str], str]:
    """(coordinates, why) of the jars Spark's ``s3a://`` needs (``storage.hadoop_aws``): ``auto``
    adds ``org.apache.hadoop:hadoop-aws`` at pyspark's Hadoop version when ``needed`` (a path is
    s3a://; its AWS SDK bundle comes along, about 700 MB on first use); ``off`` nothing;
    anything else is used as the coordinates."""
    if setting == "off" or (setting == "auto" and not needed):
        return [], f"storage.hadoop_aws={setting}"
    if setting != "auto":
        return [c.strip() for c in setting.split(",") if c.strip()], f"storage.hadoop_aws={setting}"
    version = bundled_hadoop_version()
    if version is None:
        return [], "storage.hadoop_aws=auto: pyspark ships no hadoop-client-api jar to match; set the coordinates"
    return [f"org.apache.hadoop:hadoop-aws:{version}"], f"storage.hadoop_aws=auto: Hadoop {version} (pyspark's)"
