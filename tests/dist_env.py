"""Environment for the multi-process (gloo, CPU) tests' worker processes."""
import os
from pathlib import Path


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, also on a GPU machine
    env["OMP_NUM_THREADS"] = "1"
    return env
