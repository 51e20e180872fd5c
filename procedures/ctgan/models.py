"""CT-GAN's 3-D pix2pix networks in Keras 3 (docs/ctgan-training.md).

Layer names are fixed so that the PyTorch port (procedures/attacker/port.py) can map weights by name, and so that
a G_model.h5 saved here reloads anywhere. `keras` is passed in (see procedures.attacker.keras_env) so
that importing this module never imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.equalizer import HistEqualizer

CUBE = (32, 32, 32, 1)


def _down(L, x, filters: int, name: str, bn: bool = True):
    """The encoder block G and D share: strided Conv3D, LeakyReLU 0.2, BatchNorm (momentum 0.8)."""
    x = L.Conv3D(filters, 4, strides=2, padding="same", name=f"{name}_conv")(x)
    x = L.LeakyReLU(negative_slope=0.2, name=f"{name}_lrelu")(x)
    if bn:
        x = L.BatchNormalization(momentum=0.8, name=f"{name}_bn")(x)
    return x


def build_generator(keras, gf: int = 100, img_shape=CUBE):
    """U-Net: 5 strided Conv3D down (gf, 2gf, 4gf, 8gf, 8gf), 4 up blocks, tanh output."""
    L = keras.layers

    def up(x, skip, filters, name):
        x = L.UpSampling3D(2, name=f"{name}_up")(x)
        x = L.Conv3D(filters, 4, strides=1, padding="same", activation="relu",
                     name=f"{name}_conv")(x)
        x = L.Dropout(0.5, name=f"{name}_drop")(x)
        x = L.BatchNormalization(momentum=0.8, name=f"{name}_bn")(x)
        return L.Concatenate(name=f"{name}_cat")([x, skip])

    d0 = keras.Input(shape=img_shape, name="g_in")
    d1 = _down(L, d0, gf, "g_d1", bn=False)
    d2 = _down(L, d1, gf * 2, "g_d2")
    d3 = _down(L, d2, gf * 4, "g_d3")
    d4 = _down(L, d3, gf * 8, "g_d4")
    d5 = _down(L, d4, gf * 8, "g_d5")
    u3 = up(d5, d4, gf * 8, "g_u3")
    u4 = up(u3, d3, gf * 4, "g_u4")
    u5 = up(u4, d2, gf * 2, "g_u5")
    u6 = up(u5, d1, gf, "g_u6")
    u7 = L.UpSampling3D(2, name="g_u7_up")(u6)
    out = L.Conv3D(img_shape[-1], 4, strides=1, padding="same", activation="tanh", name="g_out")(u7)
    return keras.Model(d0, out, name="generator")


def build_discriminator(keras, df: int = 100, img_shape=CUBE):
    """PatchGAN on concat(image, condition): 4 strided Conv3D (df..8df) then 1 channel: 2x2x2."""
    L = keras.layers

    img_a = keras.Input(shape=img_shape, name="d_img")
    img_b = keras.Input(shape=img_shape, name="d_cond")
    x = L.Concatenate(axis=-1, name="d_cat")([img_a, img_b])
    x = _down(L, x, df, "d_1", bn=False)
    x = _down(L, x, df * 2, "d_2")
    x = _down(L, x, df * 4, "d_3")
    x = _down(L, x, df * 8, "d_4")
    validity = L.Conv3D(1, 4, strides=1, padding="same", name="d_out")(x)
    return keras.Model([img_a, img_b], validity, name="discriminator")


def call_frozen_batch_stats(keras, D, img, cond):
    """D applied to `img`, `cond` as Keras 2 ran a frozen D inside a combined model.

    Keras 2's BatchNormalization chose batch statistics or moving averages by the learning
    phase alone, so a frozen (trainable=False) D still normalised each training batch with
    that batch's statistics, updating nothing. Keras 3 uses the moving averages whenever a
    layer is not trainable. This rebuilds D's chain of layers (shared weights) with each
    BatchNormalization replaced by a view that normalises with the batch's statistics and
    D's gamma and beta in training, and calls the layer itself (moving averages) otherwise."""
    ops = keras.ops

    class BatchStatsNorm(keras.layers.Layer):
        def __init__(self, bn, **kw):
            super().__init__(name=f"{bn.name}_batchstats", **kw)
            self.bn = bn

        def call(self, x, training=None):
            if not training:
                return self.bn(x, training=False)
            mean, var = ops.moments(x, axes=list(range(len(x.shape) - 1)))
            return ops.batch_normalization(x, mean, var, axis=-1, offset=self.bn.beta,
                                           scale=self.bn.gamma, epsilon=self.bn.epsilon)

        def compute_output_shape(self, shape):
            return shape

    cat = D.get_layer("d_cat")
    x = cat([img, cond])
    chain = D.layers[D.layers.index(cat) + 1:]   # a linear chain after the concatenation
    for layer in chain:
        x = (
            BatchStatsNorm(layer)(x)
            if isinstance(layer, keras.layers.BatchNormalization)
            else layer(x)
        )
    return keras.layers.Identity(name=D.name)(x)  # the loss keeps D's name: discriminator_loss


def write_untrained_model_dir(folder, gf: int, keras, sample_hu, seed: int = 0):
    """A CT-GAN model folder with an *untrained* (randomly initialised) generator of width `gf`
    and the preprocessing fitted on `sample_hu` (HU cubes or any HU array): G_model.h5,
    equalization.npz, normalization.npy = [mean, min, max] of the equalised sample, as
    procedures.ctgan.dataset saves them. For timing the attacker (bench.py) and tests, where the
    trained weights are absent: the arithmetic is CT-GAN's, the tampering is not realistic."""
    from procedures.ctgan.dataset import (
        save_preprocessing,
    )  # lazy: it pulls SciPy; this module stays import-light

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sample = np.asarray(sample_hu, dtype=np.float64)
    eq = HistEqualizer.fit(sample)
    e = eq.equalize(sample)
    keras.utils.set_random_seed(seed)
    build_generator(keras, gf=gf).save(folder / "G_model.h5")
    save_preprocessing(folder, eq, np.array([e.mean(), e.min(), e.max()]))
    return folder
