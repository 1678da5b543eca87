"""MI and CMI estimators against scikit-learn, the chain rule and each other (single edge vs batch)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from scgrn_assets.lib.validation import estimators
from scgrn_assets_tests.support.validation import N_BINS, sparse_like_codes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutual_information_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, N_BINS, size=500)
    y = np.where(rng.random(500) < 0.4, x, rng.integers(0, N_BINS, size=500))
    assert estimators.pair_mutual_information(x, y, N_BINS) == pytest.approx(mutual_info_score(x, y), abs=1e-12)


def test_miller_madow_adds_the_bin_count_correction():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=60)
    y = rng.integers(0, 3, size=60)
    n_joint = len(set(zip(x.tolist(), y.tolist())))
    correction = (len(set(x)) + len(set(y)) - n_joint - 1) / (2 * 60)
    assert estimators.pair_mutual_information(x, y, N_BINS, miller_madow=True) == pytest.approx(mutual_info_score(x, y) + correction)


@pytest.mark.parametrize("seed", [5, 6])
def test_cmi_satisfies_the_chain_rule(seed):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, N_BINS, size=800)
    x = np.where(rng.random(800) < 0.5, z, rng.integers(0, N_BINS, size=800))
    y = np.where(rng.random(800) < 0.5, x, rng.integers(0, N_BINS, size=800))
    joint_yz = y * N_BINS + z
    # I(X;Y,Z) = I(X;Z) + I(X;Y|Z), the left side and I(X;Z) from sklearn.
    cmi = estimators.triplet_conditional_mutual_information(x, y, z, N_BINS)
    assert mutual_info_score(x, joint_yz) == pytest.approx(mutual_info_score(x, z) + cmi, abs=1e-12)
    assert cmi > 0


def test_batch_estimators_match_the_single_edge_ones():
    rng = np.random.default_rng(7)
    codes = sparse_like_codes(rng, n_genes=8, n_cells=700)
    first, second, third = rng.integers(0, 8, size=(3, 30))
    for miller_madow in (False, True):
        batch = estimators.mutual_information_batch(codes, first, second, N_BINS, miller_madow)
        loop = [estimators.pair_mutual_information(codes[a], codes[b], N_BINS, miller_madow) for a, b in zip(first, second)]
        np.testing.assert_allclose(batch, loop, atol=1e-12)
        batch = estimators.conditional_mutual_information_batch(codes, first, second, third, N_BINS, miller_madow)
        loop = [
            estimators.triplet_conditional_mutual_information(codes[a], codes[b], codes[c], N_BINS, miller_madow)
            for a, b, c in zip(first, second, third)
        ]
        np.testing.assert_allclose(batch, loop, atol=1e-12)
