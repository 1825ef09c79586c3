"""Tests for dmg_node.segment.network: shapes, gradients and size of the GAN's two networks."""

from __future__ import annotations

import pytest
import torch

from dmg_node.segment.network import (
    Discriminator,
    Generator,
    GeneratorConfig,
    SpatialChannelSE,
    count_parameters,
)

TINY = GeneratorConfig(channels=(4, 8, 8, 8, 8), aspp_dilations=(1, 2))


def _all_grads_finite_and_some_nonzero(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_generator_maps_an_image_to_same_sized_logits() -> None:
    """The generator returns one logit channel on the input grid, for a non-cubic input."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 48, 16)
    out = Generator(TINY)(x)
    assert out.shape == (2, 1, 32, 48, 16)


@pytest.mark.slow
def test_generator_gradients_reach_every_parameter() -> None:
    """A backward pass gives every generator parameter a finite gradient."""
    torch.manual_seed(0)
    gen = Generator(TINY)
    gen(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    _all_grads_finite_and_some_nonzero(gen)


def test_discriminator_judges_image_mask_pairs_patchwise() -> None:
    """The discriminator returns a coarse map of patch logits and passes gradients to the mask."""
    torch.manual_seed(0)
    disc = Discriminator(channels=4)
    image = torch.randn(2, 1, 32, 32, 32)
    mask = torch.rand(2, 1, 32, 32, 32, requires_grad=True)
    out = disc(image, mask)
    assert out.shape[:2] == (2, 1) and 1 < out.shape[2] < 32
    out.mean().backward()
    assert mask.grad is not None and float(mask.grad.abs().sum()) > 0
    _all_grads_finite_and_some_nonzero(disc)


def test_scse_keeps_the_shape_and_reweights() -> None:
    """Spatial-channel squeeze-and-excitation keeps the tensor shape and changes its values."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, 8, 8)
    y = SpatialChannelSE(6)(x)
    assert y.shape == x.shape and not torch.allclose(x, y)


def test_default_generator_is_small_enough_for_a_cpu_node() -> None:
    """The default generator has 0.5-2 M parameters and needs inputs in multiples of 16."""
    config = GeneratorConfig()
    assert 500_000 <= count_parameters(Generator(config)) <= 2_000_000
    assert config.divisor == 16


def test_generator_config_round_trips_through_json_form() -> None:
    """GeneratorConfig.from_dict inverts to_dict."""
    assert GeneratorConfig.from_dict(TINY.to_dict()) == TINY
