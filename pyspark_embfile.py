"""Spark's automatic registration of Python data sources imports the modules named ``pyspark_*`` and takes
their ``DefaultSource``: with embfile and pyspark installed, ``spark.read.format("embfile")`` works as is.
Without pyarrow there is no DefaultSource, and Spark passes over this module."""

try:
    from embfile.spark import EmbfileDataSource as DefaultSource  # noqa: F401 - what Spark looks for
except ImportError:
    pass
