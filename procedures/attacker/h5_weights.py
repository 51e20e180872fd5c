"""CT-GAN generator weights from Keras into the PyTorch port (docs/attack.md#pytorch-port).

`from_keras_h5` reads a `G_model.h5` with h5py (never running code from the file), so a GPU
machine needs no TensorFlow; `load_keras_generator_weights` copies a loaded Keras model.
Layers are matched by our names, or by order for files written by the published code.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from procedures.attacker.keras_env import get_keras
from procedures.attacker.model_dir import load_keras_model
from procedures.attacker.port import BN_NAMES, CONV_NAMES, CTGANGeneratorTorch
from utils.errors import ModelFileError, UnsafeFileError

_CONV_KEYS = ("kernel", "bias")
_BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


def _short(weight_name: str) -> str:
    """'g_d1_conv/kernel:0' (tf_keras) or 'g_d1_conv/kernel' (Keras 3) -> 'kernel'."""
    return weight_name.split("/")[-1].split(":")[0]


def _assign(module: CTGANGeneratorTorch, layers: list[tuple[str, dict]], source: str,
            bn_eps: dict | None = None) -> CTGANGeneratorTorch:
    """Copy Keras weights (ordered [(layer name, {short name: array})]) into `module`.

    Layers are matched by name when the file uses our names; otherwise (a G_model.h5 written by
    the published code, with Keras' automatic names) by order: the n-th Conv3D and n-th
    BatchNormalization in the file's layer order, which is the model's construction order.
    """
    convs = [(n, w) for n, w in layers if set(w) >= {"kernel"}]
    bns = [(n, w) for n, w in layers if set(w) >= {"moving_mean", "moving_variance"}]
    names = {n for n, _ in layers}
    if set(CONV_NAMES) <= names and set(BN_NAMES) <= names:
        by_name = dict(layers)
        convs = [(n, by_name[n]) for n in CONV_NAMES]
        bns = [(n, by_name[n]) for n in BN_NAMES]
    if len(convs) != len(CONV_NAMES) or len(bns) != len(BN_NAMES):
        raise ModelFileError(f"{source}: expected {len(CONV_NAMES)} Conv3D and {len(BN_NAMES)} "
                             f"BatchNormalization layers of CT-GAN's generator, found "
                             f"{len(convs)} and {len(bns)}")
    with torch.no_grad():
        for tname, (kname, w) in zip(CONV_NAMES, convs):
            conv = getattr(module, tname)
            k = np.asarray(w["kernel"])
            want = tuple(conv.weight.shape[2:]) + (conv.in_channels, conv.out_channels)
            if k.shape != want:
                raise ModelFileError(f"{source}: layer {kname} kernel {k.shape}, expected {want} "
                                     f"(generator width gf={module.gf})")
            # Keras (kd, kh, kw, in, out) -> torch (out, in, kd, kh, kw)
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.transpose(4, 3, 0, 1, 2))))
            b = w.get("bias")
            conv.bias.copy_(
                torch.from_numpy(np.asarray(b)) if b is not None else torch.zeros(conv.out_channels)
            )
        for tname, (kname, w) in zip(BN_NAMES, bns):
            bn = getattr(module, tname)
            n = bn.num_features
            vals = {key: np.asarray(w[key]) if key in w else None for key in _BN_KEYS}
            for key, v in vals.items():
                if v is not None and v.shape != (n,):
                    raise ModelFileError(
                        f"{source}: layer {kname} {key} {v.shape}, expected ({n},)"
                    )
            bn.weight.copy_(
                torch.from_numpy(vals["gamma"]) if vals["gamma"] is not None else torch.ones(n)
            )
            bn.bias.copy_(
                torch.from_numpy(vals["beta"]) if vals["beta"] is not None else torch.zeros(n)
            )
            bn.running_mean.copy_(torch.from_numpy(vals["moving_mean"]))
            bn.running_var.copy_(torch.from_numpy(vals["moving_variance"]))
            if bn_eps and kname in bn_eps:
                bn.eps = float(bn_eps[kname])
    return module


def load_keras_generator_weights(module: CTGANGeneratorTorch, keras_model) -> CTGANGeneratorTorch:
    """Copy the weights of a Keras (3 or tf_keras 2) CT-GAN generator into `module`."""
    layers, eps = [], {}
    for layer in keras_model.layers:
        ws = layer.weights
        if not ws:
            continue
        names = [_short(getattr(w, "path", None) or w.name) for w in ws]
        layers.append((layer.name, dict(zip(names, layer.get_weights()))))
        if hasattr(layer, "epsilon") and hasattr(layer, "moving_mean"):
            eps[layer.name] = layer.epsilon
    return _assign(module, layers, f"Keras model {keras_model.name!r}", eps)


def read_keras_h5(path) -> tuple[list[tuple[str, dict]], dict]:
    """Weights of a Keras `.h5` (full model or weights only; Keras 3 or legacy Keras 2 layout).

    Both layouts keep, under `model_weights` (full model) or the root (save_weights), an attribute
    `layer_names` and per layer a group whose `weight_names` attribute lists dataset paths
    ('g_d1_conv/kernel' in Keras 3, 'g_d1_conv/kernel:0' in Keras 2). Reading them with h5py never
    runs code from the file. Returns ([(layer, {short name: array})], {bn layer: epsilon}).
    """
    import h5py  # lazy: h5py only to read a .h5 model

    def s(v):
        return v.decode("utf8") if isinstance(v, bytes) else str(v)

    try:
        with h5py.File(path, "r") as f:
            g = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in g.attrs:
                raise ModelFileError(f"{path}: HDF5 file without Keras layer_names")
            layers = []
            for lname in map(s, g.attrs["layer_names"]):
                lg = g[lname]
                wnames = [s(w) for w in lg.attrs.get("weight_names", [])]
                if wnames:
                    layers.append((lname, {_short(w): np.asarray(lg[w]) for w in wnames}))
            eps = {}
            cfg = f.attrs.get("model_config")
            if cfg is not None:
                try:
                    cfg_doc = json.loads(s(cfg))
                except ValueError:
                    cfg_doc = {}
                lam = _lambda_layers(cfg_doc)
                if lam:
                    # We never run the file's config, but its model is not CT-GAN's generator:
                    # what Keras would compute differs from the weights we would copy. Refused,
                    # as Keras' safe_mode refuses it (docs/safety.md#untrusted-files-never-run-code).
                    raise UnsafeFileError(f"{path}: refused: the model has Lambda layer(s) "
                                          f"{', '.join(lam[:3])} that would run Python code")
                try:
                    for layer in cfg_doc.get("config", {}).get("layers", []):
                        if layer.get("class_name") == "BatchNormalization":
                            c = layer.get("config", {})
                            if "epsilon" in c:
                                eps[c.get("name", layer.get("name"))] = float(c["epsilon"])
                except (ValueError, AttributeError):
                    pass  # the config only refines epsilon; the default 1e-3 stays
    except OSError as e:
        raise ModelFileError(f"{path}: not a readable HDF5 file ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: malformed Keras HDF5 file ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:160]})") from None
    return layers, eps


def _lambda_layers(node) -> list[str]:
    """Names of the Lambda layers anywhere in a Keras model config (nested models included)."""
    found = []
    if isinstance(node, dict):
        if node.get("class_name") == "Lambda":
            found.append(str(node.get("config", {}).get("name", node.get("name", "?"))))
        for v in node.values():
            found += _lambda_layers(v)
    elif isinstance(node, list):
        for v in node:
            found += _lambda_layers(v)
    return found


def from_keras_h5(path, device=None) -> CTGANGeneratorTorch:
    """Build a `CTGANGeneratorTorch` (eval mode) from a Keras `G_model.h5`, without Keras.

    The width gf is read from the first conv kernel. A `.keras` (zip) file has another layout:
    it is loaded through Keras (safe_mode) instead.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: generator file not found")
    if path.suffix == ".keras":
        km = load_keras_model(get_keras(), path)
        gf = int(km.layers[1].get_weights()[0].shape[-1])
        module = load_keras_generator_weights(CTGANGeneratorTorch(gf), km)
    else:
        layers, eps = read_keras_h5(path)
        first = next((w for _, w in layers if "kernel" in w), None)
        if first is None or first["kernel"].ndim != 5 or first["kernel"].shape[3] != 1:
            raise ModelFileError(f"{path}: not a CT-GAN 3-D generator (no Conv3D on 1 channel)")
        module = _assign(
            CTGANGeneratorTorch(int(first["kernel"].shape[-1])), layers, str(path), eps
        )
    module.eval()
    return module.to(device) if device is not None else module
