"""The checks the posterior must pass (evaluated by ``nb_posterior`` from its fit)."""

import dagster as dg

POSTERIOR_CHECKS = [
    dg.AssetCheckSpec("design_has_replicated_contrast", asset="nb_posterior", blocking=True,
                      description="At least one study holds both conditions with >= 2 animals each; "
                                  "single-condition studies inform only their baseline (listed)."),
    dg.AssetCheckSpec("posterior_predictive_fits", asset="nb_posterior", blocking=True,
                      description="Observed between-animal variance per gene sits inside the model's "
                                  "replicates for most genes (fails when cells are treated as replicates)."),
    dg.AssetCheckSpec("inference_is_reliable", asset="nb_posterior", blocking=True,
                      description="Importance sampling represents each gene's posterior (PSIS k-hat < 0.7 "
                                  "for >= 99% of genes)."),
]
