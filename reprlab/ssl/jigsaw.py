"""Jigsaw puzzles (Noroozi & Favaro, 2016): which permutation shuffled the 3x3 tiles of an image?

The permutation set is chosen greedily for a maximal minimum Hamming distance (the paper's "maximal" set),
deterministically from a seed, and cached in memory and on disk. Tiles are cut from a 3x3 grid over a random
square region with a gap between neighbours and a random jitter inside each cell, so that edges and textures
that continue across tiles are no shortcut; each tile is resized to ``tile_size`` and goes through the shared
encoder. Small images: a tile is cut with sub-pixel precision (bilinear) and resized up to ``tile_size``, at
least 8 px, so the 2.7 px cells of an 8x8 digit become 8x8 tiles.

Geometry helpers (``grid_boxes``, ``cut_patches``) are shared with the relative-position task.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab.data.augment import random_grayscale, to_float
from reprlab.models.encoders import Encoder
from reprlab.models.heads import pretext_head

MIN_TILE_SIZE = 8  # smallest side a tile is resized to (torchvision ResNets run on 8 px input)
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


# --------------------------------------------------------------------------------------------- geometry


def grid_boxes(batch: int, height: int, width: int, grid: int = 3, gap: float = 0.15, jitter: float = 0.075,
               region_scale: tuple[float, float] = (1.0, 1.0), device: torch.device | str = "cpu") -> Tensor:
    """(B, grid * grid, 4) boxes (x1, y1, x2, y2) in pixels of the tiles of a grid x grid puzzle, row-major.

    Per image, a square region of side ~ U[region_scale] * min(H, W) is placed uniformly; it is split into
    cells; each tile has side ``(1 - gap) * cell`` and sits at the cell centre moved by U[-jitter, jitter] *
    cell on each axis (``jitter <= gap / 2`` keeps tiles inside their cells)."""
    if not 0 <= gap < 1 or not 0 <= jitter <= gap / 2 + 1e-9:
        raise ValueError(f"need 0 <= gap < 1 and 0 <= jitter <= gap / 2, got gap={gap}, jitter={jitter}")
    if not 0 < region_scale[0] <= region_scale[1] <= 1:
        raise ValueError(f"region_scale must satisfy 0 < low <= high <= 1, got {region_scale}")
    low, high = region_scale
    side = (low + (high - low) * torch.rand(batch, 1, device=device)) * min(height, width)  # (B, 1)
    top = torch.rand(batch, 1, device=device) * (height - side)  # (B, 1)
    left = torch.rand(batch, 1, device=device) * (width - side)
    cell = side / grid  # (B, 1)
    tile = (1 - gap) * cell
    index = torch.arange(grid * grid, device=device)
    rows, cols = (index // grid).float(), (index % grid).float()  # (T,)
    shift = (2 * torch.rand(batch, grid * grid, 2, device=device) - 1) * jitter * cell[..., None]  # (B, T, 2)
    y1 = top + rows * cell + (cell - tile) / 2 + shift[..., 0]  # (B, T)
    x1 = left + cols * cell + (cell - tile) / 2 + shift[..., 1]
    return torch.stack([x1, y1, x1 + tile, y1 + tile], dim=-1)  # (B, T, 4)


def cut_patches(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Cut boxes (B, T, 4) = (x1, y1, x2, y2) from float images (B, C, H, W), each resized to size x size.

    ``roi_align`` (aligned, adaptive sampling): bilinear sampling at the output pixel centres, averaged over
    several samples per output pixel when a patch is shrunk; a box on whole pixels at its own size is an exact
    copy. Returns (B, T, C, size, size)."""
    from torchvision.ops import roi_align

    batch, tiles = boxes.shape[:2]
    owner = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(tiles)  # (B*T,)
    rois = torch.cat([owner[:, None], boxes.reshape(-1, 4)], dim=1)  # (B*T, 5)
    patches = roi_align(images, rois.to(images.dtype), output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True)  # (B*T, C, size, size)
    return patches.view(batch, tiles, *patches.shape[1:])


def standardize_patches(patches: Tensor, mean: Tensor, std: Tensor, eps: float = 1 / 255) -> Tensor:
    """Patches (..., C, s, s) in [0, 1] -> patches the encoder sees with zero mean and unit std per patch and
    channel, once it applies its own ``(x - mean) / std`` (``mean``/``std``: the encoder's buffers).

    Noroozi & Favaro normalize every tile independently so that low-level statistics (brightness, contrast,
    colour cast) cannot tell neighbours apart; a near-flat patch's std is floored at ``eps``."""
    centred = patches - patches.mean(dim=(-2, -1), keepdim=True)
    scale = patches.std(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return centred / scale * std + mean


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


def default_tile_size(height: int, width: int, grid: int, gap: float) -> int:
    """The tile's own pixel size at full region scale, at least MIN_TILE_SIZE."""
    return max(MIN_TILE_SIZE, round((1 - gap) * min(height, width) / grid))


# --------------------------------------------------------------------------------------------- method


class Jigsaw(nn.Module):
    """Permutation classification of shuffled tiles: shared encoder per tile, concatenated features -> head.

    ``num_permutations``: classes (the paper: 1000 on ImageNet; 100 suits small data). ``grid``: 3 (2 also
    works, with at most 24 permutations). ``gap`` / ``jitter``: fractions of a cell (the paper's 64 px tiles
    in 75 px cells: gap 0.15, jitter up to the remaining 0.075). ``tile_size``: pixels each tile is resized to
    (default: its own size, at least 8). ``region_scale``: side of the random square region holding the grid,
    as a fraction of the image side. ``hidden_dim``: the head's hidden width, None for a linear head.
    ``grayscale_p``: share of images turned to grayscale before tiling, and ``normalize_tiles``: every tile
    standardized on its own (:func:`standardize_patches`); the paper's guards against colour and
    low-level-statistics shortcuts (0.3 and on there). ``seed``: the permutation set's seed;
    ``cache_permutations``: also keep the set in ``~/.cache/reprlab``.
    """

    def __init__(self, encoder: Encoder, num_permutations: int = 100, grid: int = 3, gap: float = 0.15,
                 jitter: float = 0.075, tile_size: int | None = None,
                 region_scale: tuple[float, float] = (0.85, 1.0), hidden_dim: int | None = 512,
                 grayscale_p: float = 0.0, normalize_tiles: bool = False, seed: int = 0,
                 cache_permutations: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid, self.gap, self.jitter, self.tile_size = grid, gap, jitter, tile_size
        self.region_scale = tuple(region_scale)
        self.grayscale_p, self.normalize_tiles = grayscale_p, normalize_tiles
        cache_dir = default_cache_dir() if cache_permutations else None
        # not persistent: the set is a function of (num_permutations, grid, seed), rebuilt on load
        self.register_buffer("permutations", permutation_set(num_permutations, grid * grid, seed, cache_dir),
                             persistent=False)  # (P, T)
        self.head = pretext_head(grid * grid * encoder.feature_dim, num_permutations, hidden_dim)

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
        features = self.encoder(shuffled.flatten(0, 1))  # (B * T, D): one pass, BN sees every tile
        logits = self.head(features.view(shuffled.shape[0], -1))  # (B, P)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "acc": accuracy}
