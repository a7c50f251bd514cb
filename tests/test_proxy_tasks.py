"""Tests for the proxy tasks: rotation labels, jigsaw permutations and tiles, relative-position patches."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprlab.data.patches import cut_patches, grid_boxes, standardize_patches
from reprlab.models.encoders import IMAGENET_MEAN, IMAGENET_STD
from reprlab.ssl.jigsaw import Jigsaw, assemble_tiles, min_hamming_distance, permutation_set, permute_tiles
from reprlab.ssl.relative_position import NEIGHBOURS, RelativePosition
from reprlab.ssl.rotation import rotate_batch

# --------------------------------------------------------------------------------------------------- rotation


def test_rotation_labels_and_tensors():
    images = torch.rand(3, 2, 5, 5)
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (12, 2, 5, 5)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        expected = torch.rot90(images, k, dims=(2, 3))
        torch.testing.assert_close(rotated[3 * k : 3 * k + 3], expected, rtol=0, atol=0)
    # turning the k-th block by the remaining (4 - k) quarter turns gives the original image back
    for k in range(4):
        back = torch.rot90(rotated[3 * k : 3 * k + 3], 4 - k, dims=(2, 3))
        torch.testing.assert_close(back, images, rtol=0, atol=0)
    # four quarter turns are the identity
    x = images
    for _ in range(4):
        x = torch.rot90(x, 1, dims=(2, 3))
    torch.testing.assert_close(x, images, rtol=0, atol=0)


def test_rotation_label_one_is_a_counter_clockwise_quarter_turn():
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    rotated, _ = rotate_batch(image)
    # counter-clockwise: the top-right pixel (2) moves to the top-left
    assert rotated[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert rotated[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.rand(1, 1, 2, 3))


# ---------------------------------------------------------------------------------------- jigsaw permutations


def test_permutation_set_is_distinct_far_apart_and_deterministic():
    perms = permutation_set(100, 9, seed=0)
    assert perms.shape == (100, 9)
    assert all(sorted(row) == list(range(9)) for row in perms.tolist())  # every row is a permutation
    assert len({tuple(row) for row in perms.tolist()}) == 100  # distinct
    # greedy max-min selection keeps every pair >= 6 apart; 100 random permutations typically get 2-3
    assert min_hamming_distance(perms) >= 6
    random_sets = [torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(s * 1000 + i))
                                for i in range(100)]) for s in range(3)]
    assert max(min_hamming_distance(r) for r in random_sets) < min_hamming_distance(perms)
    assert torch.equal(permutation_set(100, 9, seed=0), perms)
    assert not torch.equal(permutation_set(100, 9, seed=1), perms)
    assert min_hamming_distance(permutation_set(10, 9, seed=3)) >= 8


def test_permutation_set_is_greedy_max_min_by_brute_force():
    perms = permutation_set(8, 4, seed=5).tolist()
    candidates = list(itertools.permutations(range(4)))
    for i in range(1, len(perms)):
        def min_distance(p, chosen=perms[:i]):
            return min(sum(a != b for a, b in zip(p, q)) for q in chosen)
        best = max(min_distance(p) for p in candidates)
        assert min_distance(perms[i]) == best  # each pick is a farthest candidate from the ones before it


def test_permutation_set_file_cache(tmp_path):
    first = permutation_set(7, 9, seed=11, cache_dir=tmp_path)
    files = list(tmp_path.glob("jigsaw_permutations_*.npy"))
    assert len(files) == 1
    assert np.array_equal(np.load(files[0]), first.numpy())
    second = permutation_set(7, 9, seed=11, cache_dir=tmp_path)
    assert torch.equal(first, second)
    second[0, 0] = 99  # callers get copies: the cached set cannot be corrupted
    assert permutation_set(7, 9, seed=11, cache_dir=tmp_path)[0, 0] != 99
    with pytest.raises(ValueError, match="num_permutations"):
        permutation_set(25, 4)
    with pytest.raises(ValueError, match="num_tiles"):
        permutation_set(10, 16)


# ----------------------------------------------------------------------------------------------- jigsaw tiles


def test_tiles_without_gap_are_exact_and_unpermuting_restores_the_image():
    images = torch.rand(2, 3, 12, 12)
    boxes = grid_boxes(2, 12, 12, grid=3, gap=0.0, jitter=0.0)
    tiles = cut_patches(images, boxes, size=4)  # (2, 9, 3, 4, 4)
    torch.testing.assert_close(tiles[:, 5], images[:, :, 4:8, 8:12], rtol=0, atol=1e-6)  # row 1, column 2
    torch.testing.assert_close(assemble_tiles(tiles, 3), images, rtol=0, atol=1e-6)
    perms = permutation_set(10, 9, seed=0)[torch.tensor([3, 7])]  # (2, 9)
    shuffled = permute_tiles(tiles, perms)
    assert not torch.allclose(shuffled, tiles)
    torch.testing.assert_close(shuffled[1, 4], tiles[1, perms[1, 4]])  # slot i holds tile perms[i]
    restored = permute_tiles(shuffled, perms.argsort(dim=1))
    torch.testing.assert_close(assemble_tiles(restored, 3), images, rtol=0, atol=1e-6)


def test_jigsaw_puzzles_unshuffle_to_the_image(tiny_encoder):
    torch.manual_seed(0)
    jigsaw = Jigsaw(tiny_encoder, num_permutations=12, gap=0.0, jitter=0.0, region_scale=(1.0, 1.0),
                    cache_permutations=False)
    images = torch.randint(0, 256, (4, 1, 24, 24), dtype=torch.uint8)
    shuffled, labels = jigsaw.make_puzzles(images)
    assert shuffled.shape == (4, 9, 1, 8, 8)
    restored = permute_tiles(shuffled, jigsaw.permutations[labels].argsort(dim=1))
    torch.testing.assert_close(assemble_tiles(restored, 3), images.float() / 255, rtol=0, atol=1e-6)
    # 8x8 digits: 2.7 px cells are resized up to 8 px tiles
    small, _ = jigsaw.make_puzzles(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8))
    assert small.shape == (2, 9, 1, 8, 8)


def test_standardized_patches_have_zero_mean_unit_std_as_the_encoder_sees_them():
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)  # unseeded, a near-flat patch now and then broke the tolerance
    patches = (torch.rand(2, 5, 3, 6, 6, generator=generator) * (0.2 + torch.rand(2, 5, 3, 1, 1, generator=generator))
               + torch.rand(2, 5, 3, 1, 1, generator=generator))
    seen = (standardize_patches(patches, mean, std) - mean) / std  # the encoder's own normalization
    torch.testing.assert_close(seen.mean(dim=(-2, -1)), torch.zeros(2, 5, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(seen.std(dim=(-2, -1)), torch.ones(2, 5, 3), rtol=0, atol=1e-5)
    # per patch: a patch's values are an affine function of its own pixels only
    torch.testing.assert_close(seen[1, 2], (patches[1, 2] - patches[1, 2].mean(dim=(-2, -1), keepdim=True))
                               / patches[1, 2].std(dim=(-2, -1), keepdim=True), rtol=0, atol=1e-5)
    flat = standardize_patches(torch.full((1, 3, 4, 4), 0.7), mean, std)
    torch.testing.assert_close(flat, mean.expand(1, 3, 4, 4))  # a flat patch becomes the encoder's zero


@pytest.mark.parametrize("make_patches", [
    lambda encoder: Jigsaw(encoder, num_permutations=12, grayscale_p=1.0, normalize_tiles=True,
                           cache_permutations=False).make_puzzles,
    lambda encoder: RelativePosition(encoder, patch_size=8, grayscale_p=1.0, normalize_patches=True,
                                     all_neighbours=True).make_patches,
], ids=["jigsaw", "relative_position"])
def test_shortcut_guards_grayscale_and_standardize_every_patch(tiny_encoder, make_patches):
    torch.manual_seed(0)
    patches, _ = make_patches(tiny_encoder)(torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8))
    seen = (patches - tiny_encoder.mean) / tiny_encoder.std  # (3, 9, 3, s, s): what the encoder works on
    torch.testing.assert_close(seen.mean(dim=(-2, -1)), torch.zeros(3, 9, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(seen.std(dim=(-2, -1)), torch.ones(3, 9, 3), rtol=0, atol=1e-4)
    torch.testing.assert_close(seen[:, :, 0], seen[:, :, 2], rtol=0, atol=1e-5)  # grayscale: equal channels


def test_grid_boxes_keep_tiles_inside_their_cells():
    torch.manual_seed(1)
    boxes = grid_boxes(64, 30, 30, grid=3, gap=0.2, jitter=0.1, region_scale=(1.0, 1.0))
    cell = 10.0
    for index in range(9):
        row, col = divmod(index, 3)
        x1, y1, x2, y2 = boxes[:, index].unbind(dim=1)
        assert torch.allclose(x2 - x1, torch.full_like(x1, 8.0))
        assert torch.allclose(y2 - y1, torch.full_like(y1, 8.0))
        assert (x1 >= col * cell - 1e-4).all() and (x2 <= (col + 1) * cell + 1e-4).all()
        assert (y1 >= row * cell - 1e-4).all() and (y2 <= (row + 1) * cell + 1e-4).all()
    spread = boxes[:, 0, 0].max() - boxes[:, 0, 0].min()
    assert spread > 1.0  # the jitter moves tiles (up to +-1 px here)
    with pytest.raises(ValueError, match="jitter"):
        grid_boxes(1, 30, 30, gap=0.1, jitter=0.2)


# ------------------------------------------------------------------------------------------ relative position


@pytest.mark.parametrize("all_neighbours", [True, False])
def test_relative_position_neighbour_comes_from_the_labelled_cell(tiny_encoder, all_neighbours):
    torch.manual_seed(0)
    task = RelativePosition(tiny_encoder, gap=0.0, jitter=0.0, patch_size=4, region_scale=(1.0, 1.0),
                            all_neighbours=all_neighbours)
    images = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8)
    patches, labels = task.make_patches(images)
    count = 8 if all_neighbours else 1
    assert patches.shape == (32, 1 + count, 3, 4, 4) and labels.shape == (32, count)
    x = images.float() / 255
    torch.testing.assert_close(patches[:, 0], x[:, :, 4:8, 4:8], rtol=0, atol=1e-6)  # the centre cell
    for b in range(len(images)):
        for k in range(count):
            d_row, d_col = NEIGHBOURS[int(labels[b, k])]
            top, left = 4 + 4 * d_row, 4 + 4 * d_col
            torch.testing.assert_close(patches[b, 1 + k], x[b, :, top : top + 4, left : left + 4], rtol=0,
                                       atol=1e-6)
    if all_neighbours:
        assert (labels == torch.arange(8)).all()  # every image gives all eight pairs
    else:
        assert len(set(labels.flatten().tolist())) > 4  # one neighbour per image, drawn over the eight


def test_relative_position_loss_counts_every_pair(tiny_encoder):
    """With all neighbours the loss is the mean cross-entropy over the B * 8 pairs, each pair classified from
    its [centre, neighbour] features."""
    torch.manual_seed(0)
    task = RelativePosition(tiny_encoder, patch_size=8, hidden_dim=16, all_neighbours=True).eval()
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    torch.manual_seed(1)
    loss = task({"images": images})["loss"]
    torch.manual_seed(1)
    patches, labels = task.make_patches(images)
    expected = torch.stack([
        F.cross_entropy(task.head(torch.cat([tiny_encoder(patches[b, :1]), tiny_encoder(patches[b, 1 + k, None])],
                                            dim=1)), labels[b, k, None])
        for b in range(3) for k in range(8)]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_neighbour_table_is_the_eight_offsets_in_reading_order():
    assert len(NEIGHBOURS) == 8 and len(set(NEIGHBOURS)) == 8 and (0, 0) not in NEIGHBOURS
    assert list(NEIGHBOURS) == sorted(NEIGHBOURS)
    assert all(max(abs(r), abs(c)) == 1 for r, c in NEIGHBOURS)
    assert math.isclose(RelativePosition.__init__.__defaults__[0], 1 / 3)  # the paper's half-patch gap
