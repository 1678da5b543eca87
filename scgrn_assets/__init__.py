"""scgrn-assets: public single-cell RNA-seq studies -> corpus, Bayesian effects, gene networks."""

__version__ = "0.1.0"
