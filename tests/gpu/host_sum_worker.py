"""Worker of test_gpu_distributed.py (torchrun, 2 GPUs, NCCL): Dist.sum answers while the GPU is still busy."""
import json
import time

import torch

from fasttune.train.distributed import Dist

d = Dist()
torch.distributed.barrier(group=d._host_group)  # both ranks start the measured part together
done = torch.cuda.Event()
torch.cuda._sleep(3_000_000_000)  # a few hundred ms of queued device work (cycles)
done.record()
t0 = time.perf_counter()
total = d.sum(d.rank + 1)
stopped = d.any(d.rank == 1)
elapsed = time.perf_counter() - t0
print(json.dumps({"rank": d.rank, "total": total, "any": stopped, "gpu_still_busy": not done.query(),
                  "seconds": elapsed}), flush=True)
torch.cuda.synchronize()
