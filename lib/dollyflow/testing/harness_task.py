"""A small local lm-evaluation-harness task, written on the fly (tests, and a template to copy).

:func:`write_choice_task` writes ``<name>.jsonl`` (the items) and ``<name>.yaml`` (the task:
``dataset_path: json`` on that file, so it runs offline) into a directory; pass the YAML's path
(or the directory) in ``evaluate.harness_tasks``. Each item is a question, its choices and the
index of the right one; lm-eval scores the log-likelihood of each choice after the prompt
(``output_type: multiple_choice``) and reports ``acc`` (the right choice scored highest) and
``acc_norm`` (the same per byte of the choice).
"""
from __future__ import annotations

import json
from pathlib import Path

#: Five closed questions in Dolly's spirit (the right choice is ``label``).
CHOICE_ITEMS = [
    {"question": "Which planet is known as the Red Planet?", "choices": ["Venus", "Mars", "Jupiter"], "label": 1},
    {"question": "What is the boiling point of water at sea level in Celsius?", "choices": ["100", "50", "212"],
     "label": 0},
    {"question": "Which animal is a mammal?", "choices": ["shark", "eagle", "dolphin"], "label": 2},
    {"question": "How many days are there in a leap year?", "choices": ["365", "366", "364"], "label": 1},
    {"question": "Who wrote Romeo and Juliet?", "choices": ["William Shakespeare", "Charles Dickens", "Jane Austen"],
     "label": 0},
]

TASK_TEMPLATE = """\
# lm-evaluation-harness task on a local JSONL file (no hub): evaluate.harness_tasks=[{yaml}]
task: {name}
dataset_path: json                  # datasets' JSON loader
dataset_kwargs:
  data_files:
    test: {data}                    # absolute path (a relative one is read from the driver's cwd)
test_split: test
output_type: multiple_choice        # log-likelihood of each choice after the prompt
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label                # index of the right choice
metric_list:
  - metric: acc                     # the right choice has the highest log-likelihood
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm                # the same, per byte of the choice
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_choice_task(directory: str | Path, name: str = "dolly_choice", items: list[dict] | None = None) -> Path:
    """Write the task ``name`` (its YAML and its JSONL items, :data:`CHOICE_ITEMS` by default)
    into ``directory``; returns the YAML's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for item in (CHOICE_ITEMS if items is None else items):
            f.write(json.dumps(item) + "\n")
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(TASK_TEMPLATE.format(name=name, data=json.dumps(str(data.resolve())), yaml=yaml_path),
                         encoding="utf-8")
    return yaml_path
