"""The checks the combined corpus must pass (evaluated by ``combined_corpus`` as it writes the store)."""

import dagster as dg

CORPUS_CHECKS = [
    dg.AssetCheckSpec("counts_are_non_negative_integers", asset="combined_corpus", blocking=True,
                      description="No negative, non-integer, non-finite or sentinel (INT64_MIN) counts."),
    dg.AssetCheckSpec("genes_are_the_union_of_studies", asset="combined_corpus", blocking=True,
                      description="Corpus genes plus QC-removed genes equal the union of the studies' genes."),
    dg.AssetCheckSpec("every_cell_has_a_study", asset="combined_corpus", blocking=True),
    dg.AssetCheckSpec("cells_are_not_repeated_across_studies", asset="combined_corpus",
                      description="No two studies hold an identical cell (the same count vector): a GEO "
                                  "SuperSeries next to its subseries would count those cells twice."),
]
