"""Trains each config file named on the command line, in order, then prints this process's rank.
`tests/test_distributed.py` runs it in two gloo processes, so that one launch covers several runs.

    torchrun --nproc_per_node 2 tests/distributed_worker.py A.yaml B.yaml     # configs with device: cpu
"""
import sys

import torch
from accelerate import PartialState

from opdlab.config import load_config
from opdlab.train import train

torch.set_num_threads(1)
for path in sys.argv[1:]:
    train(load_config(path), progress=False)
state = PartialState()
print(f"process {state.process_index} of {state.num_processes}: trained {len(sys.argv) - 1} runs", flush=True)
