"""The training run's own errors: shards that do not match their manifest, a loss that is not finite."""
from __future__ import annotations


class ShardCheckError(RuntimeError):
    """The shard directory does not match its manifest."""


class NonFiniteLoss(FloatingPointError):
    """The training or evaluation loss became NaN or infinite: training stops, no model is written."""


def shard_check_error(shard_dir: str, problems: list[str]) -> ShardCheckError:
    """The error for ``problems`` found verifying ``shard_dir`` (the driver's check and the ranks' alike)."""
    return ShardCheckError(f"shard directory {shard_dir} does not match its manifest: " + "; ".join(problems[:10]))
