"""Tests for reprlab.data.augment, .views and .mixing: exactness against torchvision where the maths
coincide, and the batched-randomness contract (per-sample parameters, seeded repeatability) everywhere else."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import RandomResizedCrop

from reprlab.data import augment as A
from reprlab.data import mixing as M
from reprlab.data import views as V


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch=6, channels=3, height=16, width=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8, generator=_gen(seed))


def _mid_range(batch=4, channels=3, size=12, seed=0) -> torch.Tensor:
    """Float images in [0.3, 0.7]: no adjustment below with factors in [0.6, 1.3] needs clamping."""
    return 0.3 + 0.4 * torch.rand(batch, channels, size, size, generator=_gen(seed))


# every random public op with a call that exercises its randomness; each returns (B, C, H', W')
RANDOM_OPS = {
    "crop": lambda x, g: A.random_resized_crop(x, 10, generator=g),
    "crop_rect": lambda x, g: A.random_resized_crop(x, (8, 12), generator=g),
    "flip": lambda x, g: A.random_horizontal_flip(x, generator=g),
    "jitter": lambda x, g: A.color_jitter(x, p=1.0, generator=g),
    "grayscale": lambda x, g: A.random_grayscale(x, p=0.5, generator=g),
    "blur": lambda x, g: A.gaussian_blur(x, p=1.0, kernel_size=5, generator=g),
    "rotation": lambda x, g: A.random_rotation(x, 30.0, generator=g),
    "cutout": lambda x, g: A.cutout(x, 0.4, generator=g),
    "solarize": lambda x, g: A.random_solarize(x, p=0.5, generator=g),
    "views": lambda x, g: V.ViewAugment(size=12, blur_p=0.5, solarize_p=0.2)(x, generator=g),
    "finetune": lambda x, g: V.FinetuneAugment(rotation_degrees=10, jitter_strength=1, cutout_p=0.5)(x, g),
}
EXPECTED_HW = {"crop": (10, 10), "crop_rect": (8, 12), "views": (12, 12)}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_shape_dtype_range_and_uint8_float_agree(name, channels):
    images = _images(channels=channels)
    out = RANDOM_OPS[name](images, _gen(1))
    assert out.shape == (6, channels, *EXPECTED_HW.get(name, (16, 16)))
    assert out.dtype == torch.float32 and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1
    as_float = RANDOM_OPS[name](images.float() / 255, _gen(1))
    torch.testing.assert_close(out, as_float, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_seeded_runs_repeat_and_seeds_differ(name):
    images = _images()
    first, again = RANDOM_OPS[name](images, _gen(3)), RANDOM_OPS[name](images, _gen(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, RANDOM_OPS[name](images, _gen(4)))


@pytest.mark.parametrize("name", ["crop", "jitter", "blur", "rotation", "cutout", "views", "finetune"])
def test_parameters_vary_across_the_batch(name):
    same = _images(batch=1).expand(8, -1, -1, -1)  # eight copies of one image
    out = RANDOM_OPS[name](same, _gen(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) >= 6, "a single parameter draw was shared by the whole batch"


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="C in"):
        A.random_horizontal_flip(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="batch dimension"):
        A.random_horizontal_flip(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        A.to_float(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="probability"):
        A.random_grayscale(torch.rand(2, 3, 4, 4), p=1.5)


def test_to_float():
    images = _images()
    assert torch.equal(A.to_float(images), images.float() / 255)
    floats = torch.rand(2, 3, 4, 4)
    assert A.to_float(floats) is floats


# ------------------------------------------------------------------------------------------ geometry


def test_full_square_crop_at_same_size_is_identity():
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(A.random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1)), x, rtol=0, atol=1e-5)


def test_crop_matches_torchvision_resized_crop_inside_the_box():
    x = torch.rand(1, 3, 20, 24)
    top, left, height, width = 3, 5, 9, 14
    out = A._resized_crop(x, torch.tensor([[top, left, height, width]], dtype=torch.float32), (18, 21))
    ref = TF.resized_crop(x, top, left, height, width, [18, 21], antialias=False)
    # edge rows/columns read just outside the box here, where torchvision repeats the box's edge pixel
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_crop_boxes_lie_inside_and_follow_torchvision_distribution():
    x = torch.zeros(4000, 1, 20, 30)
    boxes = A._crop_boxes(x, (0.08, 1.0), (3 / 4, 4 / 3), _gen(0))
    top, left, height, width = boxes.T
    assert torch.equal(boxes, boxes.round())
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= 20).all() and (left + width <= 30).all()
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(x[0], [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    ref = ref.float()
    pairs = [(height * width / 600, ref[:, 2] * ref[:, 3] / 600),  # area fraction
             (width / height, ref[:, 3] / ref[:, 2]),  # aspect ratio
             (top / (21 - height), ref[:, 0] / (21 - ref[:, 2]))]  # relative position
    for ours, theirs in pairs:
        assert abs(ours.mean() - theirs.mean()) < 0.03
        assert abs(ours.std() - theirs.std()) < 0.03


def test_crop_fallback_is_the_central_clamped_crop():
    # no attempt can give aspect 2..3 at full area of a square image: torchvision falls back to W x W/2
    boxes = A._crop_boxes(torch.zeros(3, 1, 10, 10), (1.0, 1.0), (2.0, 3.0), _gen(0))
    assert boxes.tolist() == [[2.0, 0.0, 5.0, 10.0]] * 3


def test_flip_folded_into_crop_equals_flipping_the_crop():
    x = torch.rand(4, 3, 12, 12)
    boxes = A._crop_boxes(x, (0.2, 1.0), (3 / 4, 4 / 3), _gen(0))
    flip = torch.tensor([True, False, True, False])
    plain = A._resized_crop(x, boxes, (10, 10))
    expected = torch.where(flip[:, None, None, None], plain.flip(-1), plain)
    torch.testing.assert_close(A._resized_crop(x, boxes, (10, 10), flip), expected, rtol=0, atol=1e-5)


def test_horizontal_flip():
    x = torch.rand(5, 3, 6, 7)
    assert torch.equal(A.random_horizontal_flip(x, p=1.0), torch.flip(x, dims=[-1]))
    assert torch.equal(A.random_horizontal_flip(x, p=0.0), x)


def test_affine_grid_matches_torch():
    theta = torch.randn(3, 2, 3, generator=_gen(0))
    expected = torch.nn.functional.affine_grid(theta, [3, 1, 5, 7], align_corners=False)
    torch.testing.assert_close(A._affine_grid(theta, 5, 7), expected, rtol=0, atol=1e-6)


def test_rotation_matches_rot90_and_torchvision_rotate():
    x = torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(A._rotate(x, torch.full((2,), 90.0)), torch.rot90(x, 1, dims=(-2, -1)),
                               rtol=0, atol=1e-5)
    x = torch.rand(1, 3, 10, 14)
    for angle in (25.0, -40.0):
        ref = TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(A._rotate(x, torch.tensor([angle])), ref, rtol=0, atol=1e-5)
    assert torch.equal(A.random_rotation(x, 0.0), x)


def test_cutout_erases_one_clipped_box_per_image():
    x = torch.ones(64, 1, 10, 10)
    out = A.cutout(x, size_fraction=0.4, generator=_gen(0))
    erased = out[:, 0] == 0  # (B, H, W)
    rows, cols = erased.any(dim=2), erased.any(dim=1)  # (B, H), (B, W)
    # the erased set is exactly the product of its row and column ranges (a rectangle) of at most 4 x 4
    assert torch.equal(erased, rows[:, :, None] & cols[:, None, :])
    assert (rows.sum(1) <= 4).all() and (cols.sum(1) <= 4).all()
    assert (erased.sum(dim=(1, 2)) == 16).any() and (erased.sum(dim=(1, 2)) < 16).any()  # clipped at borders
    assert torch.equal(A.cutout(x, 0.4, p=0.0), x)


# -------------------------------------------------------------------------------------------- colour


def test_jitter_with_zero_strength_or_zero_probability_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(A.color_jitter(x, 0, 0, 0, 0, p=1.0), x)
    assert torch.equal(A.color_jitter(x, p=0.0), x)
    assert torch.equal(A.adjust_color(x), x)


def test_jitter_factors_are_drawn_like_torchvision():
    grey = torch.full((4000, 3, 1, 1), 0.5)
    out = A.color_jitter(grey, brightness=0.4, contrast=0, saturation=0, hue=0, p=0.8, generator=_gen(0))
    factor = out[:, 0, 0, 0] / 0.5
    applied = factor != 1
    assert abs(applied.float().mean() - 0.8) < 0.03  # RandomApply(p=0.8) per image
    drawn = factor[applied]  # ~ U[0.6, 1.4]
    assert drawn.min() >= 0.6 - 1e-6 and drawn.max() <= 1.4 + 1e-6
    assert abs(drawn.mean() - 1.0) < 0.02 and abs(drawn.std() - 0.8 / math.sqrt(12)) < 0.02


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("factor", [0.6, 1.3])
@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation"])
def test_single_factor_matches_torchvision(kind, factor, channels):
    x = _mid_range(channels=channels)
    reference = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                 "saturation": TF.adjust_saturation}[kind]
    out = A.adjust_color(x, **{f"{kind}_factor": factor})
    torch.testing.assert_close(out, reference(x, factor), rtol=0, atol=1e-5)


def test_per_sample_fused_factors_match_torchvision_sequence():
    x = _mid_range(batch=4)
    brightness = torch.tensor([0.8, 1.1, 1.0, 0.9])
    contrast = torch.tensor([1.2, 0.7, 1.0, 1.1])
    saturation = torch.tensor([0.6, 1.3, 0.0, 1.0])
    out = A.adjust_color(x, brightness, contrast, saturation)
    for i in range(4):
        ref = TF.adjust_brightness(x[i], brightness[i].item())
        ref = TF.adjust_contrast(ref, contrast[i].item())
        ref = TF.adjust_saturation(ref, saturation[i].item())
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


def test_hue_leaves_grey_alone_and_is_a_no_op_on_one_channel():
    grey = torch.rand(5, 1, 6, 6).expand(-1, 3, -1, -1)
    hue = torch.tensor([-0.5, -0.2, 0.05, 0.3, 0.5])
    torch.testing.assert_close(A.adjust_color(grey, hue_factor=hue), grey, rtol=0, atol=1e-6)
    single = torch.rand(5, 1, 6, 6)
    assert torch.equal(A.adjust_color(single, hue_factor=hue, saturation_factor=0.3), single)


def test_hue_third_turn_permutes_primaries_like_torchvision():
    primaries = torch.eye(3).T.reshape(1, 3, 3, 1)  # red, green, blue pixels
    torch.testing.assert_close(A.adjust_color(primaries, hue_factor=1 / 3), TF.adjust_hue(primaries, 1 / 3),
                               rtol=0, atol=1e-5)


def _hsv_hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hexagonal HSV hue in [0, 1) of (N, 3) colours, written out as the textbook definition."""
    r, g, b = rgb.unbind(1)
    high, low = rgb.max(1).values, rgb.min(1).values
    chroma = high - low
    hue = torch.where(high == r, ((g - b) / chroma) % 6, torch.where(high == g, (b - r) / chroma + 2,
                                                                       (r - g) / chroma + 4))
    return hue / 6


@pytest.mark.parametrize("hue", [-0.1, 0.05, 0.2])
def test_hue_shift_moves_hsv_hue_like_torchvision(hue):
    colours = torch.rand(2000, 3, generator=_gen(0))
    colours = colours[colours.max(1).values - colours.min(1).values > 0.4]  # clearly coloured
    image = colours.T.reshape(1, 3, -1, 1)
    ours = A.adjust_color(image, hue_factor=hue).reshape(3, -1).T
    theirs = TF.adjust_hue(image, hue).reshape(3, -1).T
    ours_shift = (_hsv_hue(ours) - _hsv_hue(colours) + 0.5) % 1 - 0.5
    theirs_shift = (_hsv_hue(theirs) - _hsv_hue(colours) + 0.5) % 1 - 0.5
    assert abs(theirs_shift.mean() - hue) < 1e-3  # the reference itself
    # a YIQ-plane rotation moves HSV hue with std 0.015-0.036 here and fails the second bound
    assert abs(ours_shift.mean() - hue) < 0.005 and ours_shift.std() < 0.01


def test_grayscale_matches_torchvision():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(A.random_grayscale(x, p=1.0), TF.rgb_to_grayscale(x, num_output_channels=3))
    assert torch.equal(A.random_grayscale(x, p=0.0), x)
    single = torch.rand(4, 1, 8, 8)
    assert torch.equal(A.random_grayscale(single, p=1.0), single)


def test_solarize_matches_torchvision_and_inverts_only_bright_pixels():
    x = torch.rand(6, 3, 8, 8, generator=_gen(0))
    torch.testing.assert_close(A.random_solarize(x, p=1.0), TF.solarize(x, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(A.random_solarize(x, p=1.0, threshold=0.8), TF.solarize(x, 0.8), rtol=0, atol=0)
    assert torch.equal(A.random_solarize(x, p=0.0), x)
    half = A.random_solarize(x, p=0.5, generator=_gen(1))
    changed = (half != x).flatten(1).any(dim=1)  # (B,): whole images are solarized or left alone
    assert 0 < changed.sum() < 6
    assert torch.equal(half[changed], TF.solarize(x[changed], 0.5)) and torch.equal(half[~changed], x[~changed])
    grey = torch.rand(2, 1, 4, 4, generator=_gen(2))
    assert torch.equal(A.random_solarize(grey, p=1.0), TF.solarize(grey, 0.5))  # one channel works too


# ---------------------------------------------------------------------------------------------- blur


def test_blur_matches_torchvision_for_fixed_sigma():
    x = torch.rand(3, 3, 11, 13)
    sigmas = [0.5, 1.0, 1.7]
    out = A._blur(x, A._gaussian_kernels(torch.tensor(sigmas), 5))
    for i, sigma in enumerate(sigmas):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [sigma, sigma]), rtol=0, atol=1e-5)


def test_blur_preserves_constants_and_the_mean():
    constant = torch.full((4, 3, 12, 12), 0.37)
    blurred = A.gaussian_blur(constant, p=1.0, generator=_gen(0))
    torch.testing.assert_close(blurred, constant, rtol=0, atol=1e-6)
    x = torch.rand(4, 3, 32, 32, generator=_gen(1))
    blurred = A.gaussian_blur(x, p=1.0, sigma=(1.5, 2.0), generator=_gen(0))
    assert not torch.allclose(blurred, x)
    # reflect padding conserves the mean only approximately (exact for periodic padding)
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), rtol=0, atol=2e-3)
    assert torch.equal(A.gaussian_blur(x, p=0.0), x)


def test_default_kernel_size_is_odd_tenth_of_the_image():
    assert [A._default_kernel_size(s, s) for s in (16, 32, 96, 224)] == [3, 3, 9, 23]


# -------------------------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("alpha", [0.2, 1.0, 3.0])
def test_beta_sampler_moments(alpha):
    samples = M._sample_beta(alpha, (20000,), torch.zeros(1), _gen(0))
    assert ((samples >= 0) & (samples <= 1)).all()
    assert abs(samples.mean() - 0.5) < 0.01
    assert abs(samples.var() - 1 / (4 * (2 * alpha + 1))) < 0.005


def _labelled_constant_images(batch=8):
    """Image i is constant i / batch and has label i, so any pixel names its source image."""
    values = torch.arange(batch, dtype=torch.float32) / batch
    return values[:, None, None, None].expand(batch, 3, 8, 8), torch.arange(batch)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_targets_match_the_mixed_pixels(seed):
    x, labels = _labelled_constant_images()
    mixed, soft = M.mixup(x, labels, alpha=1.0, num_classes=10, generator=_gen(seed))
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lam = soft[labels, labels]  # weight on each image's own label
    for i in range(8):
        others = soft[i].clone()
        others[i] = 0
        partner = int(others.argmax()) if others.max() > 0 else i  # perm may map i to itself
        if partner != i:
            assert math.isclose(soft[i, partner].item(), 1 - lam[i].item(), abs_tol=1e-6)
            assert others.count_nonzero() == 1
        expected = lam[i] * x[i] + (1 - lam[i]) * x[partner]
        torch.testing.assert_close(mixed[i], expected, rtol=0, atol=1e-6)
    assert len(set(lam[lam < 1].tolist())) == 1  # one lambda per batch


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_targets_match_the_pasted_area(seed):
    x, labels = _labelled_constant_images()
    mixed, soft = M.cutmix(x, labels, alpha=1.0, num_classes=8, generator=_gen(seed))
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    for i in range(8):
        kept = (mixed[i] == x[i, 0, 0, 0]).float().mean()
        torch.testing.assert_close(soft[i, i], kept, rtol=0, atol=1e-6)
        if kept < 1:
            partner = int((mixed[i][mixed[i] != x[i, 0, 0, 0]][0] * 8).round())
            torch.testing.assert_close(soft[i, partner], 1 - kept, rtol=0, atol=1e-6)


def test_mixing_accepts_soft_targets():
    x, labels = _labelled_constant_images()
    soft = torch.nn.functional.one_hot(labels, 8).float()
    _, from_labels = M.mixup(x, labels, 0.4, 8, generator=_gen(0))
    _, from_soft = M.mixup(x, soft, 0.4, 8, generator=_gen(0))
    assert torch.equal(from_labels, from_soft)


# ----------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("channels", [1, 3])
def test_simclr_views_are_independent_and_one_channel_works(channels):
    augment = V.ViewAugment(size=12, blur_p=0.5)
    images = _images(channels=channels)
    views = augment.views(images, n=3, generator=_gen(0))
    assert len(views) == 3 and all(v.shape == (6, channels, 12, 12) for v in views)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    again = augment.views(images, n=3, generator=_gen(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_view_solarize_comes_last_and_draws_nothing_when_off():
    images = _images()
    plain = V.ViewAugment(size=12, blur_p=0.5)(images, _gen(0))
    # solarize_p=0 draws nothing, so adding the op left every other pipeline's random stream as it was; at
    # p=1 it solarizes the very same view
    assert torch.equal(V.ViewAugment(size=12, blur_p=0.5, solarize_p=0.0)(images, _gen(0)), plain)
    solarized = V.ViewAugment(size=12, blur_p=0.5, solarize_p=1.0)(images, _gen(0))
    assert torch.equal(solarized, TF.solarize(plain, 0.5))


def test_view_size_none_keeps_the_input_size():
    images = _images(height=16, width=20)
    assert V.ViewAugment()(images, _gen(0)).shape == (6, 3, 16, 20)
    assert V.ViewAugment(size=8)(images, _gen(0)).shape == (6, 3, 8, 8)


def test_pipelines_are_frozen_values():
    augment = V.ViewAugment(crop_scale=(0.2, 1.0))
    with pytest.raises(AttributeError):
        augment.flip_p = 0.0  # type: ignore[misc]
    same = V.ViewAugment(crop_scale=(0.2, 1.0))
    assert augment == same and hash(augment) == hash(same)


@pytest.mark.parametrize("channels", [1, 3])
def test_finetune_sizes_and_options(channels):
    images = _images(channels=channels, height=16, width=20)
    assert V.FinetuneAugment()(images, _gen(0)).shape == (6, channels, 16, 20)
    assert V.FinetuneAugment(size=12)(images, _gen(0)).shape == (6, channels, 12, 12)
    resized = V.FinetuneAugment(size=(8, 10), crop_scale=None, flip_p=0.0)(images)
    torch.testing.assert_close(resized, TF.resize(A.to_float(images), [8, 10], antialias=False),
                               rtol=0, atol=1e-5)
    no_op = V.FinetuneAugment(crop_scale=None, flip_p=0.0)(images)
    assert torch.equal(no_op, A.to_float(images))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    images = _images()
    augment = V.ViewAugment(size=12, blur_p=0.5)
    on_gpu = augment(images.cuda(), generator=_gen(0))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), augment(images, generator=_gen(0)), rtol=0, atol=1e-4)
