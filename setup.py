"""dollyflow: a wheel for Databricks python_wheel_task, spark-submit, and local runs.

pyspark is not a hard requirement: Databricks runtimes ship their own. Extras:
  spark    pyspark, delta-spark, deltalake (offline Delta), pyarrow, pandas<3, matplotlib (run report)
  train    torch, transformers>=5, accelerate, safetensors, deepspeed, mlflow-skinny, peft
  horovod  horovod[pytorch]
  ctranslate2  ctranslate2 (the infer job's CTranslate2 engine: int8/float32 on CPU, NVIDIA GPUs)
  eval     rouge-score, sacrebleu, rapidfuzz (answer-quality metrics, core/evaluation; all work offline)
  filter   presidio-analyzer (pattern recognizers only), lingua-language-detector, datatrove (the filter job)
  dev      pytest and friends, databricks-bundles (the bundle's schema, for tests)

No extra is needed on a Databricks ML GPU runtime: it ships CUDA torch; the bundle's train and
infer tasks add transformers>=5 (and deepspeed, peft for train) as libraries beside it. torch is
only in the train extra, so installing the wheel never replaces the runtime's torch.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
JOBS = ["ingest", "dedupe", "filter", "tokenize", "train", "infer", "evaluate"]


class BuildWithConf(build_py):
    """Ship conf/ inside the wheel as dollyflow/_conf, so a bundle's wheel task finds its YAML."""

    def run(self):
        super().run()
        src = HERE / "conf"
        if src.is_dir():
            dst = Path(self.build_lib) / "dollyflow" / "_conf"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)


setup(
    name="dollyflow",
    version="0.1.0",
    description="Dolly-style instruction tuning on Spark: ingest, dedupe, tokenize, train, serve",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"dollyflow.engine": ["log4j2.properties"]},
    cmdclass={"build_py": BuildWithConf},
    install_requires=[
        "pyyaml>=6",
        "numpy>=1.24",
        "xxhash>=3",
        "orjson>=3.9",
    ],
    extras_require={
        "spark": ["pyspark>=4.0.1,<=4.2.0", "delta-spark>=4.0", "deltalake>=1.2", "pyarrow>=18",
                  "pandas>=2.2,<3",
                  "matplotlib>=3.8"],   # the pipeline's run report (plots as embedded PNGs)
        "train": ["torch>=2.4", "transformers>=5", "tokenizers>=0.21", "accelerate>=1.2",
                  "safetensors>=0.4", "deepspeed>=0.16", "mlflow-skinny>=3",
                  "peft>=0.15",     # LoRA (train.method=lora) with trainable_token_indices
                  "tqdm>=4.66",     # the training progress bar
                  "matplotlib>=3.8",   # the loss plot logged to MLflow (core/plots.py)
                  "pyarrow>=18"],   # the shard reader (core/shards.py) on a GPU box without Spark
        "horovod": ["horovod[pytorch]>=0.28"],
        "ctranslate2": ["ctranslate2>=4.6"],   # infer.engine=ctranslate2 (core/generation/ct2.py)
        "eval": ["rouge-score>=0.1.2",   # ROUGE-1/2/L (pulls nltk for its Porter stemmer: no data download)
                 "sacrebleu>=2.4",       # sentence BLEU and chrF (core/evaluation/metrics.py)
                 "rapidfuzz>=3.9,<4"],   # ROUGE-L's longest common subsequence in C++ (metrics.py)
        # evaluate.harness_tasks (core/evaluation/harness.py): lm-eval's HF model class on transformers 5
        "harness": ["lm-eval[hf]>=0.4.13,<0.5"],
        # the filter job (core/filtering): personal data, language, Gopher rules; no model download
        "filter": ["presidio-analyzer>=2.2.360",      # its pattern recognizers, run without an NLP engine
                   "lingua-language-detector>=2.1",   # ships its language models in the wheel
                   "datatrove>=0.10"],                # Gopher repetition functions
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "datasketch>=1.6",
                # the object-store tests run s3proxy (Maven Central, via mvn; dollyflow.testing.s3proxy)
                "databricks-bundles>=1.22"],  # tests load the bundle's jobs into its Job/Volume classes
    },
    entry_points={
        "console_scripts": ["dollyflow=dollyflow.cli:main"]
        + [f"dollyflow-{job}=dollyflow.cli:{job}" for job in JOBS],
    },
)
