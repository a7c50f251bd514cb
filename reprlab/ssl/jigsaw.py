"""Jigsaw puzzles (Noroozi & Favaro, 2016): which permutation shuffled the 3x3 tiles of an image?

The permutation set is chosen greedily for a maximal minimum Hamming distance (the paper's "maximal" set),
deterministically from a seed, and cached in memory and on disk. Tiles are cut from a 3x3 grid over a random
square region with a gap between neighbours and a random jitter inside each cell, so that edges and textures
that continue across tiles are no shortcut; each tile is resized to ``tile_size`` and goes through the shared
encoder. Small images: a tile is cut with sub-pixel precision (bilinear) and resized up to ``tile_size``, at
least 8 px, so the 2.7 px cells of an 8x8 digit become 8x8 tiles.

The tile geometry (``reprlab.data.patches``) is shared with the relative-position task.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.contracts import Task
from reprlab.data.augment import random_grayscale, to_float
from reprlab.data.patches import cut_patches, default_tile_size, grid_boxes, standardize_patches
from reprlab.models.encoders import Encoder, PatchPooling
from reprlab.models.heads import pretext_head, tile_embedding

_MAX_ENUMERATED = math.factorial(9)  # candidate permutations are enumerated: at most 3x3 tiles


# --------------------------------------------------------------------------------------------- permutations


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/reprlab`` (default ``~/.cache/reprlab``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reprlab"


def _all_permutations(num_tiles: int) -> np.ndarray:
    """(num_tiles!, num_tiles) int8, every permutation, built by inserting tile k at each position of the
    permutations of tiles 0..k-1 (vectorized: 9! rows in milliseconds, where itertools takes a second)."""
    perms = np.zeros((1, 1), dtype=np.int8)
    for k in range(1, num_tiles):
        column = np.full((len(perms), 1), k, dtype=np.int8)
        perms = np.concatenate([np.concatenate([perms[:, :pos], column, perms[:, pos:]], axis=1)
                                for pos in range(k + 1)])
    return perms


def _greedy_permutations(num_permutations: int, num_tiles: int, seed: int) -> np.ndarray:
    """Greedy max-min Hamming selection over all num_tiles! permutations (Noroozi & Favaro, Algorithm 1):
    start from a random one, then repeatedly add the candidate farthest (in minimum Hamming distance) from the
    chosen set, ties broken by the seeded generator."""
    candidates = _all_permutations(num_tiles)  # (M, T)
    columns = np.ascontiguousarray(candidates.T)  # (T, M): one contiguous pass per tile position

    def hamming_to(permutation: np.ndarray) -> np.ndarray:
        distance = np.zeros(columns.shape[1], dtype=np.int8)
        for position, tile in enumerate(permutation):
            distance += columns[position] != tile
        return distance  # (M,)

    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(candidates)))]
    min_distance = hamming_to(candidates[chosen[0]])  # (M,) distance of every candidate to the chosen set
    for _ in range(num_permutations - 1):
        farthest = np.flatnonzero(min_distance == min_distance.max())
        pick = int(rng.choice(farthest))
        chosen.append(pick)
        np.minimum(min_distance, hamming_to(candidates[pick]), out=min_distance)
    return candidates[chosen].astype(np.int64)  # (P, T)


@functools.lru_cache(maxsize=16)
def _cached_permutations(num_permutations: int, num_tiles: int, seed: int,
                         cache_dir: str | None) -> np.ndarray:
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"jigsaw_permutations_t{num_tiles}_p{num_permutations}_s{seed}.npy"
    if path is not None and path.is_file():
        stored = np.load(path)
        if stored.shape == (num_permutations, num_tiles):
            stored.setflags(write=False)
            return stored
    permutations = _greedy_permutations(num_permutations, num_tiles, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, permutations)
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
    permutations.setflags(write=False)
    return permutations


def permutation_set(num_permutations: int, num_tiles: int = 9, seed: int = 0,
                    cache_dir: str | Path | None = None) -> Tensor:
    """(P, num_tiles) int64 permutations with a greedily maximized minimum pairwise Hamming distance.

    Deterministic for (num_permutations, num_tiles, seed); cached in memory and, when ``cache_dir`` is given
    (e.g. :func:`default_cache_dir`), in a ``.npy`` file there (1000 permutations of 9 tiles take seconds)."""
    if num_tiles < 2 or math.factorial(num_tiles) > _MAX_ENUMERATED:
        raise ValueError(f"num_tiles must be in 2..9 (a 2x2 or 3x3 grid), got {num_tiles}")
    if not 2 <= num_permutations <= math.factorial(num_tiles):
        raise ValueError(f"num_permutations must be in 2..{math.factorial(num_tiles)} for {num_tiles} tiles, "
                         f"got {num_permutations}")
    directory = None if cache_dir is None else str(cache_dir)
    cached = _cached_permutations(num_permutations, num_tiles, seed, directory)
    return torch.from_numpy(cached.copy())


def min_hamming_distance(permutations: Tensor) -> int:
    """Smallest Hamming distance between two distinct rows of (P, T) permutations."""
    distances = (permutations[:, None, :] != permutations[None, :, :]).sum(dim=2)  # (P, P)
    distances.fill_diagonal_(permutations.shape[1] + 1)
    return int(distances.min())


# --------------------------------------------------------------------------------------------- tiles


def permute_tiles(tiles: Tensor, permutations: Tensor) -> Tensor:
    """tiles (B, T, ...), permutations (B, T): slot i of image b receives tile ``permutations[b, i]``.

    ``permute_tiles(permute_tiles(t, p), p.argsort(dim=1))`` is ``t``."""
    rows = torch.arange(tiles.shape[0], device=tiles.device)[:, None]  # (B, 1)
    return tiles[rows, permutations]


def assemble_tiles(tiles: Tensor, grid: int) -> Tensor:
    """(B, grid * grid, C, s, s) row-major tiles -> (B, C, grid * s, grid * s) mosaic."""
    batch, _, channels, size, _ = tiles.shape
    x = tiles.view(batch, grid, grid, channels, size, size).permute(0, 3, 1, 4, 2, 5)  # (B, C, gr, s, gc, s)
    return x.reshape(batch, channels, grid * size, grid * size)


# --------------------------------------------------------------------------------------------- method


class Jigsaw(Task):
    """Permutation classification of shuffled tiles: shared encoder per tile, concatenated features -> head.

    ``num_permutations``: classes (the paper: 1000 on ImageNet; 100 suits small data). ``grid``: 3 (2 also
    works, with at most 24 permutations). ``gap`` / ``jitter``: fractions of a cell (the paper's 64 px tiles
    in 75 px cells: gap 0.15, jitter up to the remaining 0.075). ``tile_size``: pixels each tile is resized to
    (default: its own size, at least 8). ``region_scale``: side of the random square region holding the grid,
    as a fraction of the image side. ``tile_dim``: width of the per-tile layer between the encoder and the
    concatenation (the paper's fc6), None for none. ``hidden_dim``: the head's hidden width after the
    concatenation (the paper's fc7), None for a linear head. ``grayscale_p``: share of images turned to
    grayscale before tiling, and ``normalize_tiles``: every tile standardized on its own
    (:func:`standardize_patches`); the paper's guards against colour and low-level-statistics shortcuts (0.3
    and on there). ``seed``: the permutation set's seed; ``cache_permutations``: also keep the set in
    ``~/.cache/reprlab``. ``pool_patches``: the encoder embeds a whole image as the mean of its features over
    the grid's cells, each resized and normalized as the tiles are (:class:`PatchPooling`: the scale it was
    trained at); False: the whole image at once.
    """

    def __init__(self, encoder: Encoder, num_permutations: int = 100, grid: int = 3, gap: float = 0.15,
                 jitter: float = 0.075, tile_size: int | None = None,
                 region_scale: tuple[float, float] = (0.85, 1.0), tile_dim: int | None = None,
                 hidden_dim: int | None = 512, grayscale_p: float = 0.0, normalize_tiles: bool = False,
                 seed: int = 0, cache_permutations: bool = True, pool_patches: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid, self.gap, self.jitter, self.tile_size = grid, gap, jitter, tile_size
        self.region_scale = tuple(region_scale)
        self.grayscale_p, self.normalize_tiles = grayscale_p, normalize_tiles
        cache_dir = default_cache_dir() if cache_permutations else None
        # not persistent: the set is a function of (num_permutations, grid, seed), rebuilt on load
        self.register_buffer("permutations", permutation_set(num_permutations, grid * grid, seed, cache_dir),
                             persistent=False)  # (P, T)
        encoder.pool_patches(PatchPooling(grid, tile_size, normalize_tiles) if pool_patches else None)
        self.tile_layer = tile_embedding(encoder.feature_dim, tile_dim)
        self.head = pretext_head(grid * grid * (tile_dim or encoder.feature_dim), num_permutations, hidden_dim)

    def make_puzzles(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 or float images (B, C, H, W) -> shuffled tiles (B, T, C, s, s) and their permutations'
        labels (B,)."""
        x = to_float(images)
        if self.grayscale_p > 0:
            x = random_grayscale(x, self.grayscale_p)
        batch, _, height, width = x.shape
        size = self.tile_size or default_tile_size(height, width, self.grid, self.gap)
        boxes = grid_boxes(batch, height, width, self.grid, self.gap, self.jitter, self.region_scale,
                           x.device)  # (B, T, 4)
        tiles = cut_patches(x, boxes, size)  # (B, T, C, s, s) in grid order
        if self.normalize_tiles:
            tiles = standardize_patches(tiles, self.encoder.mean, self.encoder.std)
        labels = torch.randint(len(self.permutations), (batch,), device=x.device)  # (B,)
        return permute_tiles(tiles, self.permutations[labels]), labels

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        shuffled, labels = self.make_puzzles(batch["images"])  # (B, T, C, s, s), (B,)
        features = self.tile_layer(self.encoder.features(shuffled.flatten(0, 1)))  # (B * T, D'): one pass for all tiles
        logits = self.head(features.view(shuffled.shape[0], -1))  # (B, P)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "acc": accuracy}
