"""This process's place in a torchrun job, and the few collectives training needs.

Without torchrun the process is rank 0 of 1 and every collective returns its input, so the
training loop reads the same either way.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch


# The tensors handed to gloo collectives, one per length, kept for the whole process. gloo's
# worker thread drops its references to a finished collective a moment after the caller has the
# result, and dropping a reference to a tensor Python also holds takes the GIL. DDP keeps the
# process group and so those threads alive past destroy_process_group; if one is still that moment
# behind when the interpreter shuts down, it dies inside a C++ destructor and the finished run
# aborts (SIGABRT, "terminate called without an active exception"; seen in about 1 torchrun job in
# 15 on a loaded 2-core CPU). `Dist.stop` waits for those references to go first.
_REDUCE_BUFFERS: dict[int, torch.Tensor] = {}


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and the few collectives used.

    Every rank trains on its own random patches; gradients are averaged by DistributedDataParallel.
    Decisions that must agree (stop now, learning rate, epoch length) go through `max_`, and
    validation sums through `sum_`, so all ranks take the same branch.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL on GPUs, gloo on CPUs); one GPU per local rank."""
        if not self.enabled:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # the per-step clock/stop collectives are small CPU tensors: gloo carries them, NCCL
            # (which takes CUDA tensors only) the gradients
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        return device

    def _reduce(self, values: np.ndarray, op: str) -> np.ndarray:
        if not self.enabled:
            return values
        import torch.distributed as dist

        values = np.asarray(values, dtype=np.float64)
        buf = _REDUCE_BUFFERS.get(values.size)
        if buf is None:  # one per length, made once (this runs every training step)
            buf = _REDUCE_BUFFERS[values.size] = torch.zeros(values.size, dtype=torch.float64)
        buf.copy_(torch.from_numpy(values))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return buf.numpy().copy()

    def max_(self, values: Any) -> np.ndarray:
        return self._reduce(np.atleast_1d(np.asarray(values, dtype=np.float64)), "max")

    def sum_(self, values: Any) -> np.ndarray:
        return self._reduce(np.atleast_1d(np.asarray(values, dtype=np.float64)), "sum")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                _wait_released(list(_REDUCE_BUFFERS.values()))
                dist.destroy_process_group()


def _wait_released(tensors: list[torch.Tensor], timeout_s: float = 10.0) -> bool:
    """Wait (GIL released) until only Python holds `tensors`; False if a worker kept one past the timeout."""
    if not hasattr(torch.Tensor, "_use_count"):
        return True
    deadline = time.monotonic() + timeout_s
    alone = torch.zeros(1)._use_count()  # what a tensor held only by Python counts in this torch
    for t in tensors:
        while t._use_count() > alone:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
    return True
