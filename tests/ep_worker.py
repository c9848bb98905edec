"""Run by torchrun in the expert-parallel tests: for each case of the JSON file argv[1] (an
artifact, an .npz of inputs, where to write the outputs, and optionally a placement to move to
before a second run), every rank runs the artifact and rank 0 writes what it returned."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import moec
from moec.runtime.expert_parallel import distributed_world, init_from_env, leave
from moec.runtime.placement import Placement


def main() -> None:
    init_from_env()
    rank, world = distributed_world()
    for case in json.loads(Path(sys.argv[1]).read_text()):
        if case.get("die_rank") == rank:
            os._exit(3)  # a rank that stops without a word
        with np.load(case["inputs"]) as data:
            feeds = {k: data[k] for k in data.files}
        with moec.load(case["artifact"]) as runner:
            outputs = runner.infer(feeds)
            record = {"expert_bytes": runner.sharding.expert_bytes, "world": world}
            if "move_to" in case:
                record["moved"] = runner.apply_placement(Placement.read(case["move_to"]))
                after = runner.infer(feeds)
                outputs.update({f"after/{k}": v for k, v in after.items()})
        if rank == 0:
            np.savez(case["output"], **outputs)
            with open(case["output"] + ".json", "w") as f:
                json.dump(record, f)
    leave()


if __name__ == "__main__":
    main()
