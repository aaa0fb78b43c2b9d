"""PipelineSplit refuses a micro-batch count that is not a whole number when it is made, not in the first forward."""

import pytest

from hetrain.callbacks import PipelineSplit


@pytest.mark.parametrize("micro_batches", [2.5, 2.0, "2", True, False, 0, -1])
def test_pipeline_split_refuses_anything_but_an_integer_of_at_least_one(micro_batches):
    # 2.5 failed inside torch.tensor_split at the first step; True (an int to Python) ran unsplit without a word.
    with pytest.raises(ValueError, match=rf"pipeline micro_batches must be >= 1 and an integer, got {micro_batches!r}"):
        PipelineSplit(micro_batches)


def test_pipeline_split_takes_an_integer():
    assert PipelineSplit(3).micro_batches == 3
