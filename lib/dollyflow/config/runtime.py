"""Where this process runs: on_databricks (the one test every layer uses)."""
from __future__ import annotations

import os


def on_databricks() -> bool:
    """True inside a Databricks runtime (it sets ``DATABRICKS_RUNTIME_VERSION``)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ
