"""The run report: :mod:`.gather` reads what a pipeline run produced (Spark, Delta time travel),
:mod:`.html` draws it into one self-contained HTML page."""
