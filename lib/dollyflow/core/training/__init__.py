"""The engine-free training loop (no pyspark): batching, checkpoints, DeepSpeed config, model,
model directory, tracking, and :func:`loop.train_main`, which every launcher runs on every rank.

    spec.py         TrainSpec: what the driver hands every rank (typed, frozen, to_dict/from_dict)
    batching.py     length-grouped micro-batches, equal step counts over ranks
    data.py         a rank's records from the shard directory; a Spark-free shard builder
    dsconfig.py     DeepSpeed presets (conf/deepspeed/) and their "auto" values
    modeling.py     base model by name, LoRA, the label-only loss module, saving
    checkpoint.py   checkpoint directories, completion markers, selection, RNG states
    model_dir.py    the model directory: fingerprint, provenance, card, generation config,
                    metrics.jsonl, files, swap-in of a replacement
    tracking.py     MLflow (optional)
    distributed.py  process group and collectives
    rendezvous.py   this host's address and a free port (no torch)
    lease.py        one train job per output directory
    errors.py       ShardCheckError, NonFiniteLoss
    progress.py     rank 0's log lines and progress bar
    prepare.py      the driver's side: resolve, verify, skip/resume/conflict, the spec
    loop.py         train_main(spec): the recipe (setup, train, evaluate, save_checkpoint, save_model)
"""
