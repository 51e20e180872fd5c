"""Image similarity metrics on CT slices, each on a stated intensity scale and data range.

- rmse: raw HU, no clipping (HU).
- psnr, ssim: HU clipped to a display window (default the lung window [-1000, 400] HU) with
  data_range = the window's width (1400 HU); skimage.metrics does the arithmetic.
- psnr_image_range: raw HU with data_range = max - min of the *real* image itself. The
  published PSNR implies a different peak per column, i.e. a per-image range (docs/results.md).
- LPIPS (Zhang et al. 2018, v0.1, AlexNet): HU clipped to the window, mapped to [-1, 1],
  repeated to 3 channels. Needs real weights (see load_lpips); there is no fallback to random
  weights, which would give a meaningless number.
- perturbation_stats: RMS / max |difference| in HU of two volumes, chunked (bounded memory).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import ModelFileError

LUNG_WINDOW = (-1000.0, 400.0)


def _pair(real, test) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(real, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("empty image")
    return a, b


def window_range(window) -> float:
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window {window}: its upper bound must exceed the lower")
    return hi - lo


def rmse(real, test) -> float:
    """Root mean squared error in the images' own units (HU), no clipping."""
    a, b = _pair(real, test)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    from skimage.metrics import (
        peak_signal_noise_ratio,
    )  # lazy: scikit-image only when a metric is computed

    if np.array_equal(a, b):
        return float("inf")  # skimage would divide by zero (with a warning)
    if data_range <= 0:
        return float("nan")
    return float(peak_signal_noise_ratio(a, b, data_range=data_range))


def psnr(real, test, window=LUNG_WINDOW) -> float:
    """PSNR in dB on HU clipped to `window`, data range = window width."""
    a, b = _pair(real, test)
    lo, hi = window
    return _psnr(np.clip(a, lo, hi), np.clip(b, lo, hi), window_range(window))


def psnr_image_range(real, test) -> float:
    """PSNR in dB on raw HU with the peak = max - min of the real image (per-image range)."""
    a, b = _pair(real, test)
    return _psnr(a, b, float(a.max() - a.min()))


def ssim(real, test, window=LUNG_WINDOW) -> float:
    """Mean SSIM (skimage defaults: 7x7 uniform window, K1 0.01, K2 0.03) of 2-D images on HU
    clipped to `window`, data range = window width. Images narrower than 7 pixels use the
    largest odd window that fits; below 3 pixels SSIM is undefined (NaN)."""
    from skimage.metrics import (
        structural_similarity,
    )  # lazy: scikit-image only when a metric is computed

    a, b = _pair(real, test)
    if a.ndim != 2:
        raise ValueError(f"SSIM here is for 2-D slices, got shape {a.shape}")
    lo, hi = window
    side = min(a.shape)
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    return float(structural_similarity(np.clip(a, lo, hi), np.clip(b, lo, hi),
                                       data_range=window_range(window), win_size=win))


def perturbation_stats(protected, original, chunk: int = 16) -> dict:
    """{'rms_hu', 'max_hu', 'changed_fraction'} of protected - original, chunked along axis 0."""
    p, o = np.asarray(protected), np.asarray(original)
    if p.shape != o.shape:
        raise ValueError(f"volumes differ in shape: {p.shape} vs {o.shape}")
    sq, mx, changed = 0.0, 0.0, 0
    for z in range(0, p.shape[0], chunk):
        d = p[z:z + chunk].astype(np.float64) - o[z:z + chunk]
        sq += float(np.sum(d * d))
        mx = max(mx, float(np.abs(d).max()) if d.size else 0.0)
        changed += int(np.count_nonzero(d))
    n = max(p.size, 1)
    return {"rms_hu": float(np.sqrt(sq / n)), "max_hu": mx, "changed_fraction": changed / n}


# ----------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1)
# ----------------------------------------------------------------------------------------------
# torchvision's AlexNet `features` convolutions used by LPIPS (index: (out, in, kernel)); the
# ReLU after each is one LPIPS layer ("relu1".."relu5").
ALEX_CONVS = {
    0: (64, 3, 11),
    3: (192, 64, 5),
    6: (384, 192, 3),
    8: (256, 384, 3),
    10: (256, 256, 3),
}
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_MIN_SIDE = 32   # smaller images are upsampled (bilinear): AlexNet's pools need >= 31 px

LPIPS_WEIGHTS_HELP = """\
LPIPS weights (no download here): one file or one folder, read with torch.load(weights_only=True).
  - a file holding one state dict with torchvision AlexNet keys features.{0,3,6,8,10}.{weight,bias}
    and the LPIPS v0.1 linear heads lin{0..4}.model.1.weight, e.g. made with
      sd = torch.load("alexnet-owt-7be5be79.pth") | torch.load("lpips/weights/v0.1/alex.pth")
      torch.save(sd, "lpips_alex.pt")
  - or the state dict of an lpips.LPIPS(net="alex") module (keys net.slice*.N.*, lin*.model.1.weight);
  - or a folder holding both files above (alexnet-owt-7be5be79.pth and alex.pth): merged.
Other keys (classifier.*, scaling_layer.*) are ignored."""


def _lpips_state(path: Path) -> dict:
    from utils.checkpoint import torch_load_weights  # lazy: torch only when LPIPS is loaded

    files = (
        sorted(q for q in path.iterdir() if q.suffix in (".pth", ".pt"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise ModelFileError(f"{path}: no .pth/.pt files in this folder")
    merged = {}
    for f in files:
        # weights_only=True; a pickle asking for code is an UnsafeFileError, anything else one line
        sd = torch_load_weights(f, "cpu", what="weights file")
        if not isinstance(sd, dict):
            raise ModelFileError(f"{f}: not a state dict")
        for k, v in sd.items():
            k = str(k)
            if k.startswith("module."):
                k = k[len("module."):]
            if k.startswith("net.slice"):  # lpips.LPIPS: net.slice<k>.<features index>.<param>
                k = "features." + k.split(".", 2)[2]
            merged[k] = v
    return merged


def load_lpips(path, device="cpu"):
    """An LPIPS-AlexNet module with the given weights (see LPIPS_WEIGHTS_HELP), in eval mode.

    Missing keys or wrong shapes are a one-line ModelFileError."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: LPIPS weights not found")
    sd = _lpips_state(path)
    want = {}
    for i, (co, ci, k) in ALEX_CONVS.items():
        want[f"features.{i}.weight"] = (co, ci, k, k)
        want[f"features.{i}.bias"] = (co,)
    for j, c in enumerate(LPIPS_CHANNELS):
        want[f"lin{j}.model.1.weight"] = (1, c, 1, 1)
    for k, shape in want.items():
        if k not in sd:
            raise ModelFileError(f"{path}: LPIPS weights lack {k} (needs AlexNet features and "
                                 f"LPIPS lin0-4 heads; see --help)")
        if tuple(sd[k].shape) != shape:
            raise ModelFileError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")
    model = _build_lpips()
    model.load_state_dict({k: sd[k].float() for k in want}, strict=True)
    return model.to(device).eval()


def _build_lpips():
    import torch  # lazy: torch only when LPIPS is loaded
    import torch.nn as nn
    import torch.nn.functional as F

    class NetLin(nn.Module):
        """lpips' NetLinLayer: Dropout (identity in eval) + 1x1 conv, keys model.1.weight."""

        def __init__(self, c: int):
            super().__init__()
            self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))

        def forward(self, x):
            return self.model(x)

    class LPIPS(nn.Module):
        """LPIPS v0.1 with AlexNet (lpips.LPIPS(net='alex'), spatial=False)."""

        def __init__(self):
            super().__init__()
            # Same indices as torchvision's alexnet().features, so its state dict loads as is.
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
                nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
                nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
            self.taps = (1, 4, 7, 9, 11)  # relu1..relu5
            for j, c in enumerate(LPIPS_CHANNELS):  # lpips' key names: lin<j>.model.1.weight
                self.add_module(f"lin{j}", NetLin(c))
            # lpips ScalingLayer: the ImageNet normalisation expressed for [-1, 1] inputs.
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
                                 persistent=False)

        def _feats(self, x):
            x = (x - self.shift) / self.scale
            out = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in self.taps:  # unit-normalise each feature vector along channels
                    out.append(x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + 1e-10))
            return out

        def forward(self, a, b):
            """a, b: (N, 3, H, W) in [-1, 1] -> (N,) distances."""
            side = min(a.shape[-2:])
            if side < LPIPS_MIN_SIDE:
                f = LPIPS_MIN_SIDE / side
                size = tuple(int(round(s * f)) for s in a.shape[-2:])
                a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
            total = 0.0
            for j, (fa, fb) in enumerate(zip(self._feats(a), self._feats(b))):
                total = total + getattr(self, f"lin{j}")((fa - fb) ** 2).mean(dim=(1, 2, 3))
            return total

    return LPIPS()


def lpips_hu(model, real, test, window=LUNG_WINDOW) -> float:
    """LPIPS distance of two 2-D HU images: clipped to `window`, mapped to [-1, 1], 3 channels."""
    import torch  # lazy: torch only when LPIPS is used

    a, b = _pair(real, test)
    if a.ndim != 2:
        raise ValueError(f"LPIPS here is for 2-D slices, got shape {a.shape}")
    lo, hi = window
    span = window_range(window)
    dev = next(model.parameters()).device

    def prep(x):
        x = (np.clip(x, lo, hi) - lo) / span * 2.0 - 1.0
        return torch.from_numpy(x).float().to(dev).expand(1, 3, *x.shape)

    with torch.no_grad():
        return float(model(prep(a), prep(b))[0])
