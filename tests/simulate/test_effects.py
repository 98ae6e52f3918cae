"""Sparse-QTL mode of the simulator: exact genetic variance and QTL share, equal-magnitude QTL,
the truth recorded."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_nlme.simulate import DesignConfig, simulate_design


@pytest.mark.parametrize("share", [0.7, 1.0])
def test_sparse_qtl_mode(share):
    config = DesignConfig(
        n_varieties=120, n_markers=3000, n_days=5, sparse_qtl=True, qtl_variance_share=share
    )
    truth = simulate_design(config, seed=3).truth
    g, g_qtl = truth["genetic_value"].values, truth["qtl_genetic_value"].values
    np.testing.assert_allclose(g.std(0), config.genetic_sd, rtol=1e-10)
    np.testing.assert_allclose(g_qtl.var(0) / g.var(0), share, rtol=1e-10)
    np.testing.assert_allclose(truth["qtl_share"].values, share, rtol=1e-10)
    qtl = truth["qtl"].values
    assert (qtl.sum(0) == config.n_qtl).all() and qtl.all(1).sum() == config.n_shared_qtl
    effect = truth["marker_effect"].values
    if share == 1.0:  # no background: the QTL are the only non-zero effects, equal magnitudes
        np.testing.assert_array_equal(effect != 0, qtl)
        for k in range(3):
            magnitude = np.abs(effect[qtl[:, k], k])
            np.testing.assert_allclose(magnitude, magnitude[0], rtol=1e-10)
    assert truth.attrs["sparse_qtl"] == 1


def test_sparse_qtl_mode_needs_qtl():
    with pytest.raises(ValueError, match="sparse_qtl"):
        DesignConfig(n_qtl=0, n_shared_qtl=0, qtl_variance_share=0.0, sparse_qtl=True)
