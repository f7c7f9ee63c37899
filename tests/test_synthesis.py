"""Online anomaly synthesis: masks, textures and blends have the stated properties."""

import numpy as np
import pytest

from edge.synthesis import (
    SynthesisConfig,
    centre_foreground,
    feathered,
    perlin_mask,
    perlin_noise,
    rectangle_mask,
    self_texture,
    shifted_texture,
    synthesize,
)


def test_perlin_noise_is_zero_on_the_lattice_and_bounded():
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 64), (4, 4), rng)
    assert noise.shape == (64, 64)
    # Gradient noise vanishes at lattice points (every 16 px here).
    assert np.abs(noise[::16, ::16]).max() < 1e-6
    assert np.abs(noise).max() <= 1.0 + 1e-6
    assert noise.std() > 0.05


def test_perlin_mask_is_binary_and_covers_a_fraction():
    rng = np.random.default_rng(1)
    config = SynthesisConfig()
    fractions = []
    for _ in range(50):
        mask = perlin_mask((64, 64), config, rng)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        fractions.append(mask.mean())
    # With threshold 0.5 the regions cover a few percent of the crop on average.
    assert 0.01 < np.mean(fractions) < 0.2
    lower = SynthesisConfig(threshold=0.2)
    larger = np.mean([perlin_mask((64, 64), lower, rng).mean() for _ in range(50)])
    assert larger > 2 * np.mean(fractions)


@pytest.mark.parametrize("texture", ["self", "noise", "shifted"])
def test_blend_changes_only_the_region_and_follows_the_formula(texture):
    rng = np.random.default_rng(2)
    image = rng.random((32, 32)).astype(np.float32)
    config = SynthesisConfig(texture_weights={texture: 1.0}, opacity=(0.3, 0.3001))
    result = synthesize(image, config, rng)
    outside = result.mask == 0
    assert result.mask.sum() > 0
    assert result.texture == texture
    np.testing.assert_array_equal(result.image[outside], image[outside])
    # Inside: out = (1 - beta) * texture + beta * image, so out - beta * image is the texture
    # share, which must lie in [0, 1 - beta] for a texture in [0, 1].
    share = result.image[~outside] - result.opacity * image[~outside]
    assert share.min() >= -1e-5 and share.max() <= 1 - result.opacity + 1e-5
    assert not np.allclose(result.image[~outside], image[~outside])


def test_foreground_restricts_the_region():
    rng = np.random.default_rng(3)
    foreground = centre_foreground((64, 64), 0.5)
    config = SynthesisConfig(threshold=0.2)
    for _ in range(20):
        result = synthesize(rng.random((64, 64)).astype(np.float32), config, rng, foreground)
        assert (result.mask * (1 - foreground)).sum() == 0


def test_self_texture_shuffles_blocks_of_an_augmented_copy():
    rng = np.random.default_rng(4)
    image = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    texture = self_texture(image, 4, rng)[..., 0]
    blocks = sorted(
        texture[r : r + 2, c : c + 2].sum() for r in range(0, 8, 2) for c in (0, 2, 4, 6)
    )
    assert texture.shape == (8, 8)
    assert len(set(np.round(blocks, 4))) == 16  # 16 distinct blocks survive the shuffle
    assert not np.allclose(texture, image)


def test_shifted_texture_is_the_crop_moved():
    rng = np.random.default_rng(5)
    image = np.zeros((40, 40), np.float32)
    image[18:22, 18:22] = 1.0
    moved = shifted_texture(image, (0.25, 0.2501), rng)[..., 0]
    ys, xs = np.nonzero(moved > 0.5)
    distance = np.hypot(ys.mean() - 19.5, xs.mean() - 19.5)
    assert distance == pytest.approx(10.0, abs=1.0)


def test_synthesis_is_reproducible_from_the_seed():
    image = np.random.default_rng(6).random((32, 32)).astype(np.float32)
    first = synthesize(image, SynthesisConfig(), np.random.default_rng(7))
    second = synthesize(image, SynthesisConfig(), np.random.default_rng(7))
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.mask, second.mask)


def test_rectangle_mask_has_the_drawn_area_and_is_centred_in_the_foreground():
    rng = np.random.default_rng(8)
    config = SynthesisConfig(rectangle_sides=(0.25, 0.2501), rectangle_max_angle=0.0)
    foreground = np.zeros((64, 64), np.float32)
    foreground[30:34, 40:44] = 1.0
    for _ in range(10):
        mask = rectangle_mask((64, 64), config, rng, foreground)
        ys, xs = np.nonzero(mask)
        # Sides of 0.25 * 64 = 16 px: filled with its border pixels, 17 x 17.
        assert mask.sum() == pytest.approx(17 * 17, abs=17)
        assert 30 <= ys.mean() <= 34 and 40 <= xs.mean() <= 44


def test_rectangles_are_kept_whole_where_perlin_regions_are_cut_to_the_foreground():
    rng = np.random.default_rng(9)
    foreground = centre_foreground((64, 64), 0.3)
    rectangles = SynthesisConfig(region_weights={"rectangle": 1.0}, rectangle_sides=(0.5, 0.51))
    outside = [
        (synthesize(rng.random((64, 64)).astype(np.float32), rectangles, rng, foreground).mask)
        * (1 - foreground)
        for _ in range(5)
    ]
    # A 32 px square centred inside a 19 px ellipse always reaches past it.
    assert all(region.sum() > 100 for region in outside)


def test_region_shapes_follow_their_weights():
    rng = np.random.default_rng(10)
    config = SynthesisConfig(region_weights={"perlin": 0.0, "rectangle": 1.0}, threshold=0.9)
    image = rng.random((48, 48)).astype(np.float32)
    # A Perlin region over 0.9 is nearly always empty; rectangles never are.
    assert all(synthesize(image, config, rng).mask.sum() > 0 for _ in range(20))
    with pytest.raises(ValueError, match="no positive weight"):
        synthesize(image, SynthesisConfig(region_weights={"perlin": 0.0}), rng)


def test_a_feathered_blend_reaches_past_the_region_but_the_mask_stays_binary():
    rng = np.random.default_rng(11)
    image = np.zeros((48, 48), np.float32)
    config = SynthesisConfig(
        region_weights={"rectangle": 1.0},
        texture_weights={"noise": 1.0},
        opacity=(0.0, 0.0001),
        feather_px=(2.0, 2.0),
    )
    result = synthesize(image, config, rng)
    assert set(np.unique(result.mask)) == {0.0, 1.0}
    ring = (feathered(result.mask, 1.0) > 0.01) & (result.mask == 0)
    # Just outside the region the texture shows through the feathered edge ...
    assert result.image[ring].max() > 0.01
    # ... and inside it weighs at least half: out >= 0.5 * texture (image is zero).
    assert feathered(result.mask, 2.0)[result.mask > 0].min() >= 0.5
