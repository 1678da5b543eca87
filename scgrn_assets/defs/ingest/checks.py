"""The checks each study's AnnData must pass (evaluated by ``study_anndata`` as it writes the file)."""

import dagster as dg

STUDY_CHECKS = [
    dg.AssetCheckSpec("counts_are_non_negative_integers", asset="study_anndata", blocking=True,
                      description="No negative, non-integer, non-finite or sentinel (INT64_MIN) counts."),
    dg.AssetCheckSpec("every_cell_has_a_study", asset="study_anndata", blocking=True),
]
