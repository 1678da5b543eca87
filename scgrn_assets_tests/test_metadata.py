"""Pictures in asset metadata: a plot that fails is a warning entry, never a failed step."""

from __future__ import annotations

import numpy as np

from scgrn_assets.lib.plotting import plot_loss_curve
from scgrn_assets.metadata import plots_metadata


def test_a_failing_plot_becomes_a_warning_and_the_others_are_kept():
    def broken(values):
        raise ValueError("no axes today")

    curve = np.linspace(6.0, 5.0, 40)
    metadata = plots_metadata(("loss_curve", plot_loss_curve, curve, "loss", np.array([[20, 5.5], [40, 5.2]]), 5.6),
                              ("broken", broken, curve))
    assert "loss_curve" in metadata and "broken" not in metadata
    assert metadata["plot_warnings"] == "broken failed: ValueError: no axes today"
    assert metadata["loss_curve"].value.startswith("![plot](data:image/png;base64,")
    assert plots_metadata(("loss_curve", plot_loss_curve, curve, "loss")).keys() == {"loss_curve"}
