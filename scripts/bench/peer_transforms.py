"""lightly's per-sample transforms with the strengths of reprlab's view pipelines (bench.peer_methods' twins).

``size``: the output side where a reprlab pipeline keeps the input's (``size: None``); ``normalize``: ImageNet
statistics in the transform (off when the encoder normalizes inside, as reprlab's do). Colour jitter is passed as
explicit brightness / contrast / saturation / hue (0.8 s, 0.8 s, 0.8 s, 0.2 s for reprlab's strength s), so
lightly's per-method factors (BYOL's saturation 0.2) do not change what reprlab's pipeline sets. lightly's blur
is PIL's (sigma in (0.1, 2), the same range; its kernel spans ~3 sigma where reprlab's is 10% of the side); the
CIFAR-10 configs blur nothing. A setting lightly's transform cannot express is a one-line ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reprlab.data.views import MultiCrop, ViewAugment


def _normalize(normalize: bool) -> dict[str, Any]:
    return {} if normalize else {"normalize": None}


def _view_options(view: ViewAugment, what: str) -> dict[str, Any]:
    """lightly view-transform keywords with the strengths of one reprlab pipeline (no size, no solarize)."""
    low, high = view.crop_scale
    if high != 1.0:
        raise ValueError(f"lightly's {what} crops up to scale 1.0 only; crop_scale is {view.crop_scale}: "
                         f"set its upper bound to 1.0")
    s = view.jitter_strength
    return {"cj_prob": view.jitter_p, "cj_strength": 1.0, "cj_bright": 0.8 * s, "cj_contrast": 0.8 * s,
            "cj_sat": 0.8 * s, "cj_hue": 0.2 * s, "min_scale": low, "random_gray_scale": view.grayscale_p,
            "gaussian_blur": view.blur_p, "hf_prob": view.flip_p}


def one_pipeline_transform(cls: type, view: ViewAugment, size: int, normalize: bool) -> Callable:
    """``cls`` (SimSiamTransform, MoCoV2Transform: two draws of one pipeline) with ``view``'s strengths."""
    if view.solarize_p > 0:
        raise ValueError(f"lightly's {cls.__name__} does not solarize; solarize_p is {view.solarize_p}")
    return cls(input_size=view.size or size, **_view_options(view, cls.__name__), **_normalize(normalize))


def two_pipeline_transform(first: ViewAugment, second: ViewAugment, size: int, normalize: bool) -> Callable:
    """``BYOLTransform`` of ``BYOLView1Transform`` / ``BYOLView2Transform`` with the two pipelines' strengths
    (lightly's Barlow Twins example uses it too; ``VICRegTransform`` draws one pipeline twice, so reprlab's
    asymmetric pair needs this one)."""
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    views = [cls(input_size=view.size or size, solarization_prob=view.solarize_p,
                 **_view_options(view, cls.__name__), **_normalize(normalize))
             for cls, view in ((BYOLView1Transform, first), (BYOLView2Transform, second))]
    return BYOLTransform(*views)


def dino_transform(crops: MultiCrop, size: int, normalize: bool) -> Callable:
    """``DINOTransform`` with reprlab's multi-crop settings. lightly shares flip, colour jitter and grayscale
    across all crops, gives the two global crops one size and scale, and solarizes only the second global crop:
    other settings are refused. Its crops resize bicubically (reprlab's bilinearly)."""
    from lightly.transforms import DINOTransform

    g1, g2, local = crops.global1, crops.global2, crops.local
    shared = ("flip_p", "jitter_strength", "jitter_p", "grayscale_p")
    for field in shared:
        values = {getattr(g1, field), getattr(g2, field)} | ({getattr(local, field)} if crops.num_local else set())
        if len(values) > 1:
            raise ValueError(f"lightly's DINOTransform uses one {field} for every crop; reprlab's crops set {values}")
    if (g1.size, tuple(g1.crop_scale)) != (g2.size, tuple(g2.crop_scale)):
        raise ValueError("lightly's DINOTransform gives both global crops one size and crop scale; reprlab's differ "
                         f"({g1.size}, {g1.crop_scale}) vs ({g2.size}, {g2.crop_scale})")
    if g1.solarize_p > 0 or (crops.num_local and local.solarize_p > 0):
        raise ValueError("lightly's DINOTransform solarizes only the second global crop; set solarize_p 0 on the "
                         "first global crop and the local crops")
    s = g1.jitter_strength
    # cj_strength stays at DINOViewTransform's 0.5: DINOTransform does not pass it to the second global crop
    jitter = {"cj_strength": 0.5, "cj_bright": 1.6 * s, "cj_contrast": 1.6 * s, "cj_sat": 1.6 * s, "cj_hue": 0.4 * s}
    return DINOTransform(global_crop_size=g1.size or size, global_crop_scale=tuple(g1.crop_scale),
                         local_crop_size=local.size or size, local_crop_scale=tuple(local.crop_scale),
                         n_local_views=crops.num_local, hf_prob=g1.flip_p, cj_prob=g1.jitter_p,
                         random_gray_scale=g1.grayscale_p, gaussian_blur=(g1.blur_p, g2.blur_p, local.blur_p),
                         solarization_prob=g2.solarize_p, **jitter, **_normalize(normalize))
