"""The JVM reader behind :func:`embfile.spark.read`: ``EmbfileReader.java``, compiled against the Spark that
runs it.

A JVM data source is tied to the Spark it was compiled against, so embfile ships the source, not a jar: the
first read compiles it with the JDK's ``javac`` against that Spark's own jars and caches the jar (keyed by the
Spark version and the source); ``ADD JAR`` then gives it to the session and its executors.  Where there is no
JDK, or it does not compile, :func:`embfile.spark.read` falls back to the Python data source and says why once.

The driver plans the read here: it opens the dataset, which checks every file, and hands the reader each
partition's file with the header fields it reads by; the reader reads inside those sections only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from embfile.dataset import Dataset

SOURCE = Path(__file__).with_name("EmbfileReader.java")
CLASS = "org.embfile.spark.EmbfileReader"


class Unavailable(Exception):
    """Why this machine cannot build the JVM reader (no JDK, no Spark jars, a compile error)."""


def spark_jars() -> Path:
    """The folder of the jars of the Spark this process runs: ``$SPARK_HOME/jars``, else pyspark's own."""
    import pyspark

    for home in (os.environ.get("SPARK_HOME"), os.path.dirname(pyspark.__file__)):
        if home and (jars := Path(home, "jars")).is_dir():
            return jars
    raise Unavailable("no Spark jars (neither $SPARK_HOME/jars nor pyspark's)")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "embfile", "spark")


@functools.cache
def jar(spark_version: str) -> str:
    """The reader's jar for this Spark version, compiled on the first call of all (then from the cache)."""
    tag = hashlib.sha256(SOURCE.read_bytes() + spark_version.encode()).hexdigest()[:16]
    path = cache_dir() / f"embfile-reader-{spark_version}-{tag}.jar"
    if path.exists():
        return str(path)
    javac = shutil.which("javac") or shutil.which(os.path.join(os.environ.get("JAVA_HOME", ""), "bin", "javac"))
    if not javac:
        raise Unavailable("no JDK (javac) to compile the JVM reader")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            classes = Path(tmp, "classes")
            run = subprocess.run(
                [javac, "--release", "17", "-nowarn", "-cp", f"{spark_jars()}/*", "-d", str(classes), str(SOURCE)],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                first = next((line for line in run.stderr.splitlines() if "error" in line), run.stderr.strip())
                raise Unavailable(f"the JVM reader does not compile against Spark {spark_version}: {first}")
            built = Path(tmp, path.name)
            with zipfile.ZipFile(built, "w") as z:
                for f in sorted(classes.rglob("*.class")):
                    z.write(f, f.relative_to(classes).as_posix())
            os.replace(built, path)  # whole, or not there: processes compiling at once each put a whole jar
    except OSError as e:
        raise Unavailable(f"cannot build the JVM reader in {path.parent}: {e}") from None
    return str(path)


def load(spark: Any) -> None:
    """Give ``spark``'s session (and so its executors) the reader's jar, once.

    The session's driver reads the jar by its path: a Spark Connect server elsewhere does not see this
    machine's file, and Spark then only logs the failure, so the jar's place in ``LIST JAR`` is checked."""
    path = jar(spark.version)

    def added() -> bool:
        return any(row[0].endswith(os.path.basename(path)) for row in spark.sql("LIST JAR").collect())

    if not added():
        spark.sql(f"ADD JAR '{path}'")
        if not added():
            raise Unavailable(f"the session's driver could not add the JVM reader's jar {path} (not a file it sees?)")


def partitions(ds: Dataset, slices: list[tuple[int, int]]) -> str:
    """The option the reader plans its partitions from: a line per partition, records ``[lo, hi)`` of one file
    (``slices`` never cross a file), with that file's path, its identity (size, header checksum) and the
    checked header fields the reader reads by (of ragged records, where their row offsets lie)."""
    lines, first = [], 0
    files = iter(ds.files)
    f = next(files, None)
    for lo, hi in slices:
        while f is not None and lo >= first + f.count:
            first += f.count
            f = next(files, None)
        assert f is not None and hi <= first + f.count
        h, lookup = f.header, f.mappings()[0]
        crc = int.from_bytes(lookup[252:256], "little")
        path = base64.b64encode(os.path.abspath(f.path).encode()).decode()
        fields = (h.file_size, crc, h.records_offset, h.keys_offset, h.keys_size, h.count, h.dim)
        ragged = (h.ranges_offset, h.rows) if f.ragged else (0, 0)
        lines.append(" ".join(map(str, (path, *fields, lo - first, hi - first, *ragged))))
    return "\n".join(lines)
