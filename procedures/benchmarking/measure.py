"""Measuring a block: peak memory, CPU seconds, load, and the device's matmul peak (bench.py)."""
from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc

import torch


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Memory:
    """Peak memory of a block: CUDA allocator peak on a GPU; sampled RSS on the CPU. Also the
    process's CPU seconds and the 1-minute load average at the end: on a shared machine, wall
    time is only comparable between runs of similar load."""

    def __init__(self, device):
        self.device = device
        self.result: dict = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_cuda = torch.cuda.memory_allocated(self.device)
        self._base = self._peak = _rss_bytes() or 0
        self._cpu0 = _cpu_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        tracemalloc.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc):
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        mb = 2.0 ** 20
        self.result = {
            "cpu_s": round(_cpu_seconds() - self._cpu0, 2),
            "load_avg_1min": load_average(),
            "rss_peak_mb": round(self._peak / mb, 1),
            "rss_growth_mb": round((self._peak - self._base) / mb, 1),
            "python_numpy_peak_mb": round(py_peak / mb, 1),
        }
        if self.device.type == "cuda":
            self.result["cuda_peak_mb"] = round(
                torch.cuda.max_memory_allocated(self.device) / mb, 1
            )
            self.result["cuda_peak_over_start_mb"] = round(
                (torch.cuda.max_memory_allocated(self.device) - self._base_cuda) / mb, 1)
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> dict:
    """Measured matmul throughput (FLOP/s) of this device: the yardstick for the FLOP fraction."""
    res = {}
    kinds = [("fp32", torch.float32, False)]
    if device.type == "cuda":
        kinds = [
            ("bf16", torch.bfloat16, False),
            ("tf32", torch.float32, True),
            ("fp32", torch.float32, False),
        ]
    n = 8192 if device.type == "cuda" else 2048
    for name, dt, tf32 in kinds:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            a @ b
            sync(device)
            best = float("inf")  # the best of several: other jobs on a shared CPU only slow it down
            for _ in range(5):
                reps = 10 if device.type == "cuda" else 1
                t = time.perf_counter()
                for _ in range(reps):
                    a @ b
                sync(device)
                best = min(best, (time.perf_counter() - t) / reps)
            res[name] = 2 * n ** 3 / best
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return res


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
