"""spark-submit tests/cluster/sql_generate.py TABLE_PATH [--env E] [key=value ...]: register
``dolly_generate`` from the infer config and answer the first rows of the Delta table at
TABLE_PATH from ``spark.sql`` on the executors; prints one JSON document: the rows, and where the
executors found the model the driver shipped."""
import json
import os
import sys

from pyspark import SparkFiles

from dollyflow.config import load_config
from dollyflow.engine.infer import register_udf, ship_model, resolve_spec
from dollyflow.engine.session import get_session, master_of

table, args = sys.argv[1], sys.argv[2:]
env = args[args.index("--env") + 1] if "--env" in args else None
overrides = [a for i, a in enumerate(args) if a != "--env" and (i == 0 or args[i - 1] != "--env")]
cfg = load_config("infer", overrides, env=env)
spark = get_session(cfg.spark)
register_udf(spark, cfg)
rows = spark.sql(f"SELECT record_id, instruction, context, g.response, g.finish_reason, g.completion_tokens, "
                 f"g.error FROM (SELECT record_id, instruction, context, dolly_generate(instruction, context) AS g "
                 f"FROM (SELECT * FROM delta.`{table}` ORDER BY record_id LIMIT 3))").collect()
name = ship_model(spark, resolve_spec(cfg.infer), cfg.tables.shared_mounts).shipped
seen = spark.sparkContext.parallelize(range(4), 2).map(
    lambda _: (os.getpid(), os.path.isfile(os.path.join(SparkFiles.get(name), "config.json")) if name else None)
).collect()
print(json.dumps({"master": master_of(spark), "shipped": name, "executors_see_shipped": [s for _, s in seen],
                  "rows": [r.asDict() for r in rows]}))
