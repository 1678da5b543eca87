"""log-normalised expression against a dense numpy computation."""

import numpy as np
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.benchmarks.expression import log_normalized


@pytest.mark.parametrize("seed", range(3))
def test_log_normalized_equals_dense_numpy(seed):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.7, size=(40, 25))
    n_counts = counts.sum(axis=1) + rng.integers(1, 50, size=40)  # library over more genes than these
    expected = np.log1p(counts / n_counts[:, None] * 1e4)
    result = log_normalized(sp.csr_matrix(counts), n_counts, dtype=np.float64)
    np.testing.assert_allclose(result.toarray(), expected, rtol=1e-12)
    assert log_normalized(sp.csr_matrix(counts), n_counts).dtype == np.float32


def test_non_positive_library_sizes_are_refused():
    with pytest.raises(ScgrnInputError, match="n_counts"):
        log_normalized(sp.csr_matrix(np.ones((2, 2))), np.array([3.0, 0.0]))
