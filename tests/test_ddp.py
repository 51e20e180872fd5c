"""train.py under torchrun with DistributedDataParallel (gloo, CPU): 2 ranks x 2 slabs give the
same weights as 1 rank x 4 slabs (docs/training.md#several-gpus). The whitebox preset: U-Net (GroupNorm), PatchGAN,
gradients through the PyTorch CT-GAN port, one attacker per rank.

float64: in float32 the runs agree to ~1e-5, not better, because Adam turns the rounding noise of
gradients that are exactly zero in exact arithmetic (conv biases right before a GroupNorm of one
channel per group or a BatchNorm) into steps of up to lr; in float64 that noise stays far below
Adam's eps, so the comparison can be tight."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_phantom
from utils.checkpoint import load_checkpoint
from utils.scan_io import Scan, save_mhd

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, data: Path, models: Path, out: Path, *extra) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "train.py",
           "--preset", "whitebox", "--data_dir", str(data), "--models_dir", str(models), "--out_dir", str(out),
           "--g_width", "4", "--d_width", "4", "--lr_g", "0.01", "--epochs", "1", "--device", "cpu",
           "--progress", "false", "--sample_every", "0", "--save_img_result", "false", "--dtype", "float64",
           *extra]
    # Same threading in every run: float sums must not depend on the number of threads.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return load_checkpoint(out / "checkpoint.pt")


def weights(state: dict) -> dict:
    """Parameters only: BatchNorm running statistics are per rank (DDP broadcasts rank 0's)."""
    return {f"{net}.{k}": v for net in ("generator", "discriminator") for k, v in state[net].items()
            if "running_" not in k and "num_batches_tracked" not in k}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_scans")
    for i in range(5):  # --batch 4: stream 0 owns volumes 0 and 4, streams 1-3 one volume each
        save_mhd(Scan(make_phantom((16, 32, 32), seed=i), (2.5, 1.0, 1.0), (0.0, 0.0, 0.0)), d / f"v{i}.mhd")
    return d


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_same_global_batch(volumes, tiny_ctgan_models, tmp_path):
    # Each rank runs two slabs a step (two forwards of G and four of D before one backward).
    one = torchrun(1, volumes, tiny_ctgan_models, tmp_path / "one", "--batch", "4", "--max_steps", "3")
    two = torchrun(2, volumes, tiny_ctgan_models, tmp_path / "two", "--batch", "4", "--max_steps", "3")
    assert one["step"] == two["step"] == 3
    # All 4 slabs of the 3 steps got the white-box term, counted over both ranks.
    for state in (one, two):
        assert state["disruption"] == {**state["disruption"], "sub_batches": 12, "computed": 12, "errors": {}}
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11, msg=k)
    # Training moved the generator (its output conv starts at zero).
    assert a["generator.out.weight"].abs().max() > 1e-3
