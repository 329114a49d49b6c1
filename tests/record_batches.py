"""train_text2image.py, for torchrun, that also writes down the sample indices of every batch each process draws:
one JSON line per batch in $RECORD_BATCHES/rank_<rank>.jsonl. The world-size tests compare the data order of runs
on different numbers of processes with it."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_text2image  # noqa: E402
from cosmos_t2i.training_data import BucketBatchSampler  # noqa: E402


def recording(directory):
    """A BucketBatchSampler.__iter__ that appends each batch it yields to `directory`/rank_<rank>.jsonl.
    With no dataloader workers, a batch is drawn exactly when the training loop takes it."""
    draw = BucketBatchSampler.__iter__

    def draw_and_record(sampler):
        with open(Path(directory) / f"rank_{sampler.rank}.jsonl", "a") as log:
            for batch in draw(sampler):
                log.write(json.dumps(batch) + "\n")
                log.flush()
                yield batch

    return draw_and_record


if __name__ == "__main__":
    BucketBatchSampler.__iter__ = recording(os.environ["RECORD_BATCHES"])
    train_text2image.main(train_text2image.parse_args())
