"""Shared fixtures: a miniature stage-1 run (a few steps of each phase) that several tests read."""
import pytest

import train

# flags that make a full stage-1 run take seconds: few scenes, few steps, small batches
FAST = ["--n-train-scenes", "12", "--vq-steps", "4", "--vq-batch", "8", "--steps", "6", "--batch-size", "4",
        "--micro-batch", "2", "--n-eval", "2", "--n-vqa", "3", "--log-every", "1", "--warmup", "2", "--ground-steps", "3"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished miniature stage-1 run folder (untrained weights, but every file a real run writes)."""
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    train.main(["--stage", "1", "--out", out] + FAST)
    return out
