"""dollyflow: own an instruction-following LLM the way Databricks built Dolly 2.0.

Engine-free core (``dollyflow.core``), Spark glue (``dollyflow.engine``), jobs (``dollyflow.jobs``).
"""
__version__ = "0.1.0"
