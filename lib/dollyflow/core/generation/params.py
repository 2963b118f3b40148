"""Generation parameters and results: :class:`GenerationParams` (what decides the generated text,
and so a prediction's identity), :class:`Generation` (one row's answer) and the finish reasons."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ERROR)

ERROR_EMPTY_INSTRUCTION = "empty instruction: nothing to answer"
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class GenerationParams:
    """What decides the generated text (and so belongs in a prediction's identity).

    Dolly's generation defaults are ``do_sample=True, max_new_tokens=256, top_p=0.92, top_k=0``
    (temperature 1). The defaults here keep those values but decode greedily: batch scoring
    should be reproducible run after run; set ``do_sample=True`` for Dolly's sampling.
    """
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.92
    top_k: int = 0
    seed: int = 42

    def __post_init__(self):
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample:
            if not float(self.temperature) > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < float(self.top_p) <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if int(self.top_k) < 0:
                raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")

    def to_dict(self) -> dict:
        """The parameters that matter: sampling knobs are dropped when decoding greedily, so
        greedy runs with different (unused) top_p values share one identity."""
        d = asdict(self)
        if not self.do_sample:
            for k in ("temperature", "top_p", "top_k", "seed"):
                d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """16 hex digits of sha256 over :meth:`to_json` (the predictions table's key part)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]


@dataclass
class Generation:
    """One row's answer. ``completion_tokens`` counts every generated token, the stop token
    included (what the model computed); ``response`` excludes it. ``seconds`` is the time from
    the start of the row's batch to the row's last token."""
    response: str | None
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    trimmed_context_tokens: int = 0
    seconds: float | None = None
    token_ids: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def failed(cls, message: str, prompt_tokens: int | None = None, trimmed: int = 0) -> "Generation":
        return cls(None, FINISH_ERROR, prompt_tokens, None, message[:MAX_ERROR_CHARS], trimmed)
