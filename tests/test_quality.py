"""Label-free quality metrics on embeddings with known answers."""

import itertools
import math

import pytest
import torch

from reprlab.evaluate.quality import (
    alignment,
    effective_rank,
    embedding_std,
    mean_cosine,
    quality_report,
    uniformity,
)


def gaussian(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed))


def test_identical_views_are_perfectly_aligned():
    z = gaussian(50, 8)
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-10)
    assert alignment(z, 3.0 * z) == pytest.approx(0.0, abs=1e-10)  # scale-free: features are normalised
    assert alignment(z, -z) == pytest.approx(4.0)  # antipodal: ||u - (-u)||^2 = 4


def test_alignment_and_uniformity_match_loops():
    z1, z2 = gaussian(12, 4, seed=1), gaussian(12, 4, seed=2)
    unit1 = [row / row.norm() for row in z1.double()]
    unit2 = [row / row.norm() for row in z2.double()]
    expected_alignment = sum(float((a - b).norm()) ** 3 for a, b in zip(unit1, unit2)) / 12
    assert alignment(z1, z2, alpha=3) == pytest.approx(expected_alignment, rel=1e-5)
    pairs = [float((a - b).norm()) ** 2 for a, b in itertools.combinations(unit1, 2)]  # distinct pairs only
    expected_uniformity = math.log(sum(math.exp(-2 * d) for d in pairs) / len(pairs))
    assert uniformity(z1) == pytest.approx(expected_uniformity, rel=1e-5)


def test_mean_cosine_matches_a_loop_over_distinct_pairs():
    z = gaussian(9, 5, seed=4) + 0.5  # a shared offset, so the mean is well away from 0
    unit = [row / row.norm() for row in z.double()]
    pairs = [float(a @ b) for a, b in itertools.combinations(unit, 2)]
    assert float(mean_cosine(z)) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    ray = torch.rand(7, 1) * gaussian(1, 5)  # one direction, norms differ
    assert float(mean_cosine(ray)) == pytest.approx(1.0, abs=1e-6)
    assert float(mean_cosine(torch.eye(6))) == pytest.approx(0.0, abs=1e-7)  # orthogonal rows
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_cosine(gaussian(1, 5))


def test_collapsed_embeddings():
    z = gaussian(1, 16).repeat(200, 1) + 1e-9 * gaussian(200, 16, seed=3)
    assert embedding_std(z) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-3)
    assert uniformity(z) == pytest.approx(0.0, abs=1e-6)  # every pair at distance 0


def test_isotropic_gaussian():
    dim = 16
    z = gaussian(4000, dim, seed=4)
    assert dim - 0.5 < effective_rank(z) <= dim
    assert embedding_std(z) == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    assert uniformity(z[:500]) < -1.5  # well spread on the sphere


def test_effective_rank_counts_the_spanned_subspace():
    basis = torch.linalg.qr(gaussian(32, 32, seed=5))[0][:, :4]  # 4 orthonormal directions in 32-D
    z = gaussian(2000, 4, seed=6) @ basis.T  # isotropic inside a 4-D subspace
    assert effective_rank(z) == pytest.approx(4.0, abs=0.2)


def test_quality_report_keys_and_subsampling():
    z = gaussian(300, 8, seed=7)
    report = quality_report(z, z + 0.01 * gaussian(300, 8, seed=8), max_uniformity_samples=100)
    assert set(report) == {
        "num_samples",
        "dim",
        "uniformity",
        "effective_rank",
        "embedding_std",
        "embedding_std_isotropic",
        "alignment",
    }
    assert report["num_samples"] == 300 and report["dim"] == 8
    assert report["embedding_std_isotropic"] == pytest.approx(1 / math.sqrt(8))
    assert report["alignment"] < 0.01
    assert report["uniformity"] == pytest.approx(uniformity(z), abs=0.2)  # a 100-sample estimate
    assert "alignment" not in quality_report(z)
