"""The engine-free training loop (no pyspark): batching, checkpoints, DeepSpeed config, model,
output directory, tracking, and :func:`loop.train_main`, which every launcher runs on every rank.

    batching.py     length-grouped micro-batches, equal step counts over ranks
    data.py         a rank's records from the shard directory; a Spark-free shard builder
    dsconfig.py     DeepSpeed presets (conf/deepspeed/) and their "auto" values
    modeling.py     base model by name, LoRA, the label-only loss module, saving
    checkpoint.py   checkpoint directories, completion markers, selection, RNG states
    output.py       fingerprint, provenance, model card, generation config, metrics.jsonl
    tracking.py     MLflow (optional)
    distributed.py  process group and collectives
    prepare.py      the driver's side: resolve, verify, skip/resume/conflict, the spec
    loop.py         train_main(spec)
"""
