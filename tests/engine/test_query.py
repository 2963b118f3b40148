"""infer.query: only a query runs (Spark's own parser decides), anything else fails before it runs."""
import pytest

from dollyflow.engine.query import NotAQuery, check_query, run_query, wrap

pytestmark = pytest.mark.spark

QUERIES = {   # text -> the rows it gives over the view qv(a int) holding 1, 2, 3
    "SELECT a FROM qv WHERE a > 1": [2, 3],
    "  /* a comment */ -- another\n ((SELECT a FROM qv WHERE a = 1)) ;  ": [1],
    "WITH x AS (SELECT a FROM qv) SELECT a FROM x WHERE a < 3;;": [1, 2],
    "VALUES (7), (8) AS v(a)": [7, 8],
    "TABLE qv": [1, 2, 3],
    "FROM qv SELECT a WHERE a = 3": [3],
    "(SELECT a FROM qv WHERE a = 1) UNION ALL (SELECT a FROM qv WHERE a = 2) ORDER BY a": [1, 2],
    "SELECT a FROM qv WHERE a IN (SELECT max(a) FROM qv) -- trailing comment;": [3],
}

REFUSED = [
    "DROP TABLE qv",
    "DROP VIEW qv",
    "/* c */ DELETE FROM qv",
    "INSERT INTO qv VALUES (4)",
    "SET dollyflow.test.flag=1",
    "GRANT SELECT ON qv TO someone",
    "CREATE TEMPORARY FUNCTION f AS 'com.example.F' USING JAR '/tmp/evil.jar'",
    "CACHE TABLE qv",
    "EXPLAIN SELECT 1",
    "SELECT a FROM qv; DROP VIEW qv",
    "SELECT a FROM qv;\nDROP VIEW qv;",
    "WITH x AS (SELECT 1 AS a) INSERT INTO qv SELECT a FROM x",
    "WITH x AS (DELETE FROM qv) SELECT 1",
    "FROM qv INSERT INTO qv SELECT a",
    "BEGIN DROP VIEW qv; END",
    "SELECT 1) AS q; DROP VIEW qv; SELECT * FROM (SELECT 1",   # aimed at the subquery wrapper
    "SELECT 1 /* unclosed",
    "   ;  ",
]


@pytest.fixture
def qv(spark):
    spark.createDataFrame([(1,), (2,), (3,)], "a int").createOrReplaceTempView("qv")
    yield "qv"
    spark.catalog.dropTempView("qv")


@pytest.mark.parametrize("check", [True, False], ids=["spark-parser", "wrapper-only"])
def test_queries_run(spark, qv, check):
    for text, want in QUERIES.items():
        assert sorted(r[0] for r in run_query(spark, text, check=check).collect()) == sorted(want), text


@pytest.mark.parametrize("check", [True, False], ids=["spark-parser", "wrapper-only"])
def test_anything_else_fails_before_it_runs(spark, qv, check):
    """Both layers refuse every statement (``check=False``: the subquery wrapper alone, as on
    Spark Connect, where there is no JVM parser to ask), and nothing ran: the view is there with
    its rows, the setting unset."""
    for text in REFUSED:
        with pytest.raises(NotAQuery, match="infer.query"):
            run_query(spark, text, check=check)
        assert sorted(r[0] for r in spark.table("qv").collect()) == [1, 2, 3], text
        assert spark.conf.get("dollyflow.test.flag", None) is None, text


def test_the_message_names_the_statement(spark, qv):
    with pytest.raises(NotAQuery, match=r"this one is a DropTable statement, so nothing was run"):
        check_query(spark, "DROP TABLE qv")
    with pytest.raises(NotAQuery, match=r"must be a single query \(SELECT, WITH ... SELECT, VALUES, TABLE"):
        check_query(spark, "SELECT 1; DROP TABLE qv", what="infer.query")
    assert check_query(spark, "SELECT 1 ;\n") == "SELECT 1"
    assert wrap("SELECT 1 -- c") == "SELECT * FROM (\nSELECT 1 -- c\n) AS dollyflow_query"
