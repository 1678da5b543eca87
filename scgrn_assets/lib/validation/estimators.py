"""MI and conditional MI in nats from quantile codes: single-edge references and batch estimators.

The single-edge estimators are plain numpy (the references the tests check the rest against); the
batch estimators run the compiled kernels of ``_kernels.py`` over many edges per call."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.validation._kernels import pair_mi_kernel, triplet_cmi_kernel, triplet_count_kernel

# Edges per compiled call: small enough for a progress callback to be useful.
_BATCH_SIZE = 4096


def _entropy_term(counts: np.ndarray) -> tuple[float, int]:
    """(sum n log n, number of non-empty cells) of a count array."""
    positive = counts[counts > 0].astype(np.float64)
    return float(np.sum(positive * np.log(positive))), int(positive.size)


def pair_mutual_information(x_codes: np.ndarray, y_codes: np.ndarray, n_bins: int, miller_madow: bool = False) -> float:
    """Plug-in mutual information I(X;Y) in nats of two code vectors of shape (n_cells,).

    With ``miller_madow`` each entropy gets the Miller-Madow bias correction
    ``(K - 1) / (2 n_cells)`` (K = non-empty cells), i.e. MI gains ``(Kx + Ky - Kxy - 1) / (2 n_cells)``.
    """
    x_codes = np.asarray(x_codes, dtype=np.int64)
    y_codes = np.asarray(y_codes, dtype=np.int64)
    n_cells = x_codes.shape[0]
    joint = np.bincount(x_codes * n_bins + y_codes, minlength=n_bins * n_bins).reshape(n_bins, n_bins)
    joint_term, k_joint = _entropy_term(joint)
    x_term, k_x = _entropy_term(joint.sum(axis=1))
    y_term, k_y = _entropy_term(joint.sum(axis=0))
    mi = (joint_term - x_term - y_term + n_cells * math.log(n_cells)) / n_cells
    if miller_madow:
        mi += (k_x + k_y - k_joint - 1) / (2.0 * n_cells)
    return mi


def triplet_conditional_mutual_information(
    x_codes: np.ndarray, y_codes: np.ndarray, z_codes: np.ndarray, n_bins: int, miller_madow: bool = False
) -> float:
    """Plug-in conditional mutual information I(X;Y|Z) in nats of three code vectors (n_cells,).

    ``I = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)``; with ``miller_madow`` each entropy is
    Miller-Madow corrected, i.e. CMI gains ``(Kxz + Kyz - Kxyz - Kz) / (2 n_cells)``.
    """
    x_codes = np.asarray(x_codes, dtype=np.int64)
    y_codes = np.asarray(y_codes, dtype=np.int64)
    z_codes = np.asarray(z_codes, dtype=np.int64)
    n_cells = x_codes.shape[0]
    joint = np.bincount((x_codes * n_bins + y_codes) * n_bins + z_codes, minlength=n_bins**3)
    joint = joint.reshape(n_bins, n_bins, n_bins)
    xyz_term, k_xyz = _entropy_term(joint)
    xz_term, k_xz = _entropy_term(joint.sum(axis=1))
    yz_term, k_yz = _entropy_term(joint.sum(axis=0))
    z_term, k_z = _entropy_term(joint.sum(axis=(0, 1)))
    cmi = (xyz_term - xz_term - yz_term + z_term) / n_cells
    if miller_madow:
        cmi += (k_xz + k_yz - k_xyz - k_z) / (2.0 * n_cells)
    return cmi


# The batch estimators: compiled, many edges per call.


@dataclass(frozen=True)
class _CodeIndex:
    """What the kernels need: codes, each gene's non-zero-code cells and its bin counts."""

    codes: np.ndarray  # (n_genes, n_cells) uint8
    nonzero_indptr: np.ndarray  # (n_genes + 1,) int64
    nonzero_cells: np.ndarray  # (n_nonzero,) int64, ascending within a gene
    margins: np.ndarray  # (n_genes, n_bins) int64
    klogk: np.ndarray  # (n_cells + 1,) k log k
    log_factorial: np.ndarray  # (n_cells + 1,) log k!


def _code_index(codes: np.ndarray, n_bins: int) -> _CodeIndex:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) >= n_bins:
        raise ScgrnInputError(f"codes reach {int(codes.max())}, n_bins is {n_bins}", fix="pass the n_bins used to discretise")
    n_genes, n_cells = codes.shape
    gene_of_nonzero, nonzero_cells = np.nonzero(codes)
    nonzero_indptr = np.zeros(n_genes + 1, dtype=np.int64)
    nonzero_indptr[1:] = np.cumsum(np.bincount(gene_of_nonzero, minlength=n_genes))
    margins = np.zeros((n_genes, n_bins), dtype=np.int64)
    for code in range(n_bins):
        margins[:, code] = (codes == code).sum(axis=1)
    k = np.arange(n_cells + 1, dtype=np.float64)
    klogk = k * np.log(np.maximum(k, 1.0))
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(k[1:]))])
    return _CodeIndex(codes, nonzero_indptr, nonzero_cells.astype(np.int64), margins, klogk, log_factorial)


def _triplet_count_tables(index: _CodeIndex, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(n, n_bins, n_bins, n_bins) tables of the given triplets (for the G-test)."""
    return triplet_count_kernel(index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins, x, y, z)


def _batches(n_items: int) -> list[slice]:
    return [slice(start, min(start + _BATCH_SIZE, n_items)) for start in range(0, n_items, _BATCH_SIZE)]


def mutual_information_batch(
    codes: np.ndarray, first: np.ndarray, second: np.ndarray, n_bins: int, miller_madow: bool = False
) -> np.ndarray:
    """MI in nats of many gene pairs at once.

    Parameters
    ----------
    codes
        Shape (n_genes, n_cells), quantile codes (gene-major, as in :class:`~scgrn_assets.lib.validation.discretization.DiscretizedGenes`).
    first, second
        Shape (n_pairs,), row indices into ``codes``.

    Returns
    -------
    Shape (n_pairs,), equal to :func:`pair_mutual_information` of each pair.
    """
    index = _code_index(codes, n_bins)
    mi, _ = pair_mi_kernel(
        index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
        np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64), index.klogk, miller_madow,
    )
    return mi


def conditional_mutual_information_batch(
    codes: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, n_bins: int, miller_madow: bool = False
) -> np.ndarray:
    """I(X;Y|Z) in nats of many gene triplets (rows of ``codes``, each shape (n_triplets,))."""
    index = _code_index(codes, n_bins)
    return triplet_cmi_kernel(
        index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
        np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64), np.asarray(z, dtype=np.int64), index.klogk, miller_madow,
    )
