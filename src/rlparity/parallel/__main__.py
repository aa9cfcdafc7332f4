"""`torchrun --nproc-per-node N -m rlparity.parallel module:function`: fn() on every rank, rank 0's value printed."""

import importlib
import sys

import torch
import torch.distributed as dist

from rlparity.parallel.launch import init_from_env


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or ":" not in argv[0]:
        raise SystemExit("usage: torchrun --nproc-per-node N -m rlparity.parallel module:function")
    module_name, _, attr = argv[0].partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    init_from_env()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # torchrun sets OMP_NUM_THREADS=1 as well; ranks share the cores
    try:
        value = fn()
        if dist.get_rank() == 0 and value is not None:
            print(value)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
