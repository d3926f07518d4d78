"""Visual anagrams: invertible views, the per-step averaged noise estimate, and what each view of the result shows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loraforge.errors import ConfigError
from loraforge.render.illusion import get_view, illusion_eps, illusion_grid, illusion_sample



pytestmark = pytest.mark.usefixtures("one_torch_thread")


ALL_VIEWS = ["identity", "vflip", "hflip", "rot90", "rot180", "rot270", "negate", "jigsaw", "jigsaw:2:5"]


@pytest.mark.parametrize("name", ALL_VIEWS)
def test_view_apply_and_inverse_are_inverse(name):
    view = get_view(name)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(view.inverse(view.apply(x)), x)
    assert torch.equal(view.apply(view.inverse(x)), x)
    if name != "identity":
        assert not torch.equal(view.apply(x), x)


def test_views_move_pixels_where_expected():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert get_view("vflip").apply(x)[0, 0, 0].tolist() == [12, 13, 14, 15]  # bottom row on top
    assert get_view("hflip").apply(x)[0, 0, 0].tolist() == [3, 2, 1, 0]
    assert get_view("rot180").apply(x)[0, 0, 0, 0] == 15
    assert get_view("rot90").apply(x)[0, 0, 0].tolist() == [3, 7, 11, 15]  # counter-clockwise
    assert torch.equal(get_view("negate").apply(x), -x)
    jig = get_view("jigsaw:2:1").apply(x)[0, 0]
    patches = {tuple(jig[i:i + 2, j:j + 2].flatten().tolist()) for i in (0, 2) for j in (0, 2)}
    original = {tuple(x[0, 0, i:i + 2, j:j + 2].flatten().tolist()) for i in (0, 2) for j in (0, 2)}
    assert patches == original  # whole patches move, their insides stay
    assert torch.equal(get_view("jigsaw:2:1").apply(x), jig[None, None])  # seeded: the same permutation


def test_bad_views_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown illusion view 'spin'"):
        get_view("spin")
    with pytest.raises(ConfigError, match="jigsaw"):
        get_view("jigsaw:1")


class FakeUNet(torch.nn.Module):
    """ε(x, t, c) = x·mean(c) + P: linear in x, prompt-dependent, and position-dependent through P."""

    def __init__(self, shape):
        super().__init__()
        self.P = torch.arange(float(np.prod(shape))).reshape(shape) / 10

    def forward(self, x, t, encoder_hidden_states):
        k = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=x * k + self.P)


@pytest.mark.parametrize("joint", [False, True])
def test_averaged_eps_maps_each_view_back(joint):
    shape = (1, 2, 4, 4)
    unet = FakeUNet(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cond_a, cond_b, uncond = torch.full((1, 3, 2), 2.0), torch.full((1, 3, 2), 5.0), torch.full((1, 3, 2), 1.0)
    g = 3.0
    views = [get_view("identity"), get_view("vflip"), get_view("negate")]
    adapters = ["a", "b", "c"] if joint else None
    eps, per_view = illusion_eps(unet, x, torch.tensor(10), views, [cond_a, cond_b, cond_a], uncond, g,
                                 adapters=adapters, per_view=True)
    P = unet.P
    # CFG multiplies x by k_u + g(k_c − k_u); each view's position term P comes back through the inverse.
    k_a, k_b = 1 + g * (2 - 1), 1 + g * (5 - 1)
    expected_identity = x * k_a + P
    expected_vflip = x * k_b + P.flip(-2)          # flip(flip(x)·k + P) = x·k + flip(P)
    expected_negate = x * k_a - P                  # −((−x)·k + P) = x·k − P
    for got, want in zip(per_view, [expected_identity, expected_vflip, expected_negate]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(eps, (expected_identity + expected_vflip + expected_negate) / 3)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_path):
    from loraforge.models.base import base_from_path
    from loraforge.models.pipeline import load_pipeline

    return load_pipeline(base_from_path(tiny_sd_path, "builtin:tiny-sd", tiny_sd_path.parent.parent.parent), "cpu", torch.float32)


@pytest.mark.parametrize("view, undo", [("vflip", "vflip"), ("rot90", "rot270")])
def test_the_flipped_image_is_what_was_denoised_for_the_second_prompt(tiny_pipe, view, undo):
    v = get_view(view)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    upright = illusion_sample(tiny_pipe, ["a cat", "a dog"], ["identity", view], steps=4, guidance=4.0,
                              latents=x_T, output="latent")
    # Denoising v(x_T) with "a dog" upright and "a cat" under v⁻¹ must give exactly v(upright):
    # the illusion seen through v is the image the model denoised for the second prompt.
    swapped = illusion_sample(tiny_pipe, ["a dog", "a cat"], ["identity", undo], steps=4, guidance=4.0,
                              latents=v.apply(x_T), output="latent")
    torch.testing.assert_close(swapped, v.apply(upright), atol=1e-4, rtol=1e-4)
    assert (swapped - upright).abs().mean() > 0.05  # not a symmetric image: the test can fail
    plain = illusion_sample(tiny_pipe, ["a cat"], ["identity"], steps=4, guidance=4.0, latents=x_T, output="latent")
    assert (plain - upright).abs().mean() > 0.01  # the second view changes the result

    image, per_view = illusion_sample(tiny_pipe, ["a cat", "a dog"], ["identity", view], steps=4, guidance=4.0,
                                      latents=x_T, return_views=True)
    swapped_image = illusion_sample(tiny_pipe, ["a dog", "a cat"], ["identity", undo], steps=4, guidance=4.0,
                                    latents=v.apply(x_T))
    assert np.abs(np.asarray(per_view[1], np.float32) - np.asarray(swapped_image, np.float32)).max() <= 1.0
    assert np.abs(np.asarray(per_view[0], np.float32) - np.asarray(image, np.float32)).max() == 0


def test_illusion_sample_checks_prompts_and_views(tiny_pipe, tmp_path):
    with pytest.raises(ConfigError, match="one prompt per view: got 1 prompt"):
        illusion_sample(tiny_pipe, ["a cat"], ["identity", "vflip"], steps=2)
    image, per_view = illusion_sample(tiny_pipe, ["a cat", "a dog"], ["identity", "rot180"], seed=2, steps=3,
                                      return_views=True)
    grid = illusion_grid(per_view, ["a cat", "a dog"], ["identity", "rot180"])
    grid.save(tmp_path / "grid.png")
    assert image.size == (64, 64) and grid.width >= 2 * 128
