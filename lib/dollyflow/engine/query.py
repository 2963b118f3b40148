"""User SQL that must be a query: classified by Spark's own parser before anything runs.

``infer.query`` (and the ``query`` parameter of the ``dolly_batch_inference`` bundle job) is SQL
from whoever configures the job, and it runs with the job's identity. ``spark.sql`` runs *any*
statement (``DROP``, ``DELETE``, ``INSERT``, ``GRANT``, ``SET``, ``CREATE FUNCTION ... USING
JAR``), eagerly, so the text is checked first and only a query is let through: ``SELECT``,
``WITH ... SELECT``, ``VALUES``, ``TABLE t``, ``FROM t SELECT ...``, set operations and pipe
syntax, possibly parenthesised, with comments anywhere and trailing semicolons.

Why Spark's parser and not a SQL library or a regex: the only faithful answer to "what will
``spark.sql`` do with this text" is the grammar of the session that runs it (its dialect, its
ANSI mode, Databricks' extensions). Two layers, both Spark's parser:

1. classic sessions (a JVM): ``sessionState.sqlParser.parseQuery(text)`` parses the text with
   the grammar's ``query`` rule up to the end of the input. A statement that is not a query
   (``DROP TABLE``, ``WITH x AS (...) INSERT ...``, ``SELECT 1; DROP TABLE t``) is a parse error
   there; ``parsePlan`` then names what the statement is, for the message.
2. always (Spark Connect has no JVM to ask): the text runs as the subquery of
   ``SELECT * FROM (<text>) AS dollyflow_query``. In Spark's grammar a subquery in FROM can only
   be a query, so a statement that is not one cannot run: it is a parse error on the server,
   before anything executes, whatever the text does to the parentheses.
"""
from __future__ import annotations

import contextlib
import logging

ALIAS = "dollyflow_query"
ACCEPTED = "a single query (SELECT, WITH ... SELECT, VALUES, TABLE, FROM ... SELECT)"


class NotAQuery(ValueError):
    """The text is not one query; nothing was run."""


def _strip(text: str) -> str:
    """The text without surrounding whitespace and trailing semicolons (``SELECT 1;``)."""
    text = str(text or "").strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text


@contextlib.contextmanager
def _quiet_sql_errors():
    """pyspark logs every SQL error it converts (with a stack trace) on its SQLQueryContextLogger;
    a refused statement is not an error of the job's, so that logger is muted around the check."""
    logger = logging.getLogger("SQLQueryContextLogger")
    disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled


def _jvm_parser(spark):
    """The session's SQL parser, or None on Spark Connect (no JVM on the client)."""
    try:
        return spark._jsparkSession.sessionState().sqlParser()
    except Exception:   # Spark Connect session, or a session without a JVM gateway
        return None


def _message(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines[:4])[:600]


def check_query(spark, text: str, what: str = "infer.query") -> str:
    """The text (stripped of trailing semicolons) when it is one query; else :class:`NotAQuery`
    naming ``what`` and what the statement is. Runs nothing."""
    sql = _strip(text)
    if not sql:
        raise NotAQuery(f"{what} is empty")
    parser = _jvm_parser(spark)
    if parser is None:
        return sql               # Spark Connect: the subquery wrapper of run_query is the guard
    with _quiet_sql_errors():
        try:
            parser.parseQuery(sql)
            return sql
        except Exception as e:   # py4j: ParseException from the JVM
            reason = _message(e)
        try:
            kind = f"a {parser.parsePlan(sql).getClass().getSimpleName()} statement"
        except Exception as e:
            kind = f"not a single statement Spark can parse ({_message(e)})"
    raise NotAQuery(f"{what} must be {ACCEPTED}, because it runs with the job's identity; this one is "
                    f"{kind}, so nothing was run. Spark's parser, reading it as a query: {reason}")


def wrap(sql: str) -> str:
    """``sql`` as the subquery of a SELECT (the newline ends a trailing ``--`` comment)."""
    return f"SELECT * FROM (\n{sql}\n) AS {ALIAS}"


def run_query(spark, text: str, what: str = "infer.query", check: bool = True):
    """A DataFrame of the query ``text`` (see the module doc); :class:`NotAQuery` before anything
    runs when it is not one. ``check=False`` skips the JVM check (layer 1): the wrapper alone,
    as on Spark Connect."""
    sql = check_query(spark, text, what) if check else _strip(text)
    if not sql:
        raise NotAQuery(f"{what} is empty")
    from pyspark.errors import ParseException   # the base of the classic and the Connect class

    try:
        with _quiet_sql_errors():
            return spark.sql(wrap(sql))
    except ParseException as e:
        raise NotAQuery(f"{what} must be {ACCEPTED}, because it runs with the job's identity; Spark could "
                        f"not parse it as one, so nothing was run: {_message(e)}") from None
