"""Shapes, dtypes and basic properties of every generator/discriminator variant."""
import pytest
import torch

import config as config_mod
from discriminator import PatchDiscriminator, PublishedDiscriminator, build_discriminator
from generator import PublishedGenerator, UNetGenerator, build_generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (37, 53)])
def test_generators_keep_shape_dtype_and_range(dtype, hw):
    torch.manual_seed(0)
    x = torch.rand(2, 4, *hw, dtype=dtype) * 2 - 1
    for G in (PublishedGenerator(width=8, blocks=2), UNetGenerator(slab=4, width=4, depth=3)):
        G = G.to(dtype)
        y = G(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert y.abs().max() <= 1.0


def test_unet_starts_at_identity_and_respects_eps():
    torch.manual_seed(0)
    G = UNetGenerator(slab=4, width=4, depth=2)
    x = torch.rand(1, 4, 32, 32) * 1.6 - 0.8
    assert torch.equal(G(x), x)  # zero-initialised output conv: protected == real at step 0
    torch.nn.init.normal_(G.out.weight, 0, 1.0)
    eps = 0.01
    y = G(x, scale=eps)
    assert (y - x).abs().max() <= eps + 1e-7
    assert (y - x).abs().max() > eps / 10  # the bound is reached, not trivially satisfied


def test_bounded_unet_starts_off_the_identity():
    """With an eps bound the white-box loss has zero gradient at protected == real and int16
    rounding erases < 0.5 HU, so a bounded U-Net starts at a small perturbation (a few % of eps
    on average), an unbounded one at the identity."""
    torch.manual_seed(0)
    x = torch.rand(1, 4, 64, 64) * 1.6 - 0.8
    bounded = build_generator(config_mod.make_config("whitebox", g_width=8))
    unbounded = build_generator(config_mod.make_config("demo"))
    assert torch.equal(unbounded(x), x)
    p = bounded.perturbation(x)
    assert 0.02 < p.abs().mean().item() < 0.5


def test_noise_delta_changes_output():
    torch.manual_seed(0)
    G = PublishedGenerator(width=8, blocks=1)
    x = torch.zeros(1, 4, 16, 16)
    d1, d2 = torch.rand_like(x), torch.rand_like(x)
    assert torch.equal(G(x, d1), G(x, d1))
    assert not torch.equal(G(x, d1), G(x, d2))


def test_published_discriminator_layout_at_512():
    D = PublishedDiscriminator(ndf=1, size=512)
    convs = [m for m in D.net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [1, 2, 4, 8, 8, 8, 8, 1]
    assert [c.stride[0] for c in convs] == [2] * 7 + [1]
    bns = [m for m in D.net if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6
    out = D(torch.zeros(1, 2, 512, 512))
    assert out.shape == (2,)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_discriminators_on_small_slices(size):
    x = torch.rand(1, 4, size, size) * 2 - 1
    assert PublishedDiscriminator(1, size)(x).shape == (4,)
    p = PatchDiscriminator(4, 8)(x)
    assert p.ndim == 4 and p.shape[:2] == (1, 1)
    probs = PublishedDiscriminator(1, size, sigmoid_head=True)(x)
    assert ((probs > 0) & (probs < 1)).all()


def test_builders_follow_config():
    cfg = config_mod.make_config("demo")
    assert isinstance(build_generator(cfg), UNetGenerator)
    assert isinstance(build_discriminator(cfg, 64), PatchDiscriminator)
    ref = config_mod.make_config("reference")
    assert isinstance(build_generator(ref), PublishedGenerator)
    d = build_discriminator(ref, 512)
    assert isinstance(d, PublishedDiscriminator) and d.sigmoid_head
