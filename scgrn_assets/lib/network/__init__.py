"""Gene networks from the model: rank-value tokens, the Geneformer-architecture model, attention and
cross-cell partial correlation, streamed moments.

Modules:

- ``attention``: Gene networks from Geneformer attention: attention → partial correlation → streaming
  edge moments → edge table.
- ``cell_features``: Per-cell gene features for the cross-cell network, chunk by chunk, and the gene
  universe they cover.
- ``cross_cell``: Gene networks from a partial correlation computed across cells, streamed per study.
- ``dense_moments``: Dense per-pair moment stores: one slot per gene pair, for gene universes up to a
  few thousand genes.
- ``dictionaries``: Geneformer's dictionaries and conventions: token and gene-median dictionaries,
  published or built from the corpus, and the two conventions (Theodoris et al. 2023; Chen et al. 2024):
- ``edge_moments``: Per-edge streaming moments (n, mean, M2) of partial correlation over cells, merged
  exactly.
- ``feature_moments``: Mergeable sufficient statistics of a per-cell gene feature: n, Σx, Σxxᵀ over a
  gene universe, plus the two higher sums Ledoit–Wolf shrinkage needs (Σ‖x‖²x and Σ‖x‖⁴), streamed chunk
  by chunk.
- ``model``: Geneformer models: load a published checkpoint, or train a small one on the corpus.
- ``pair_moments``: Per gene pair streaming moments (n, mean, M2) in an open-addressing hash map, for
  large gene universes.
- ``partial_correlation``: Partial correlation of each cell's gene × gene attention block, by named
  methods.
- ``tokens``: Geneformer's rank-value encoding of a cells × genes count matrix.

Public names are importable from the package (``from scgrn_assets.lib.network import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "attention": ("first_gene_slots", "last_layer_attention_block", "sort_slots_by_gene",
        "add_attention_blocks", "attention_edge_moments", "edge_table"),
    "cell_features": ("token_columns", "rank_value_features", "rank_value_chunks", "log_expression_chunks",
        "hidden_state_chunks", "select_gene_universe", "genes_seen_with_others"),
    "cross_cell": ("WithinStudyCovariance", "within_study_covariance", "ledoit_wolf_shrunk",
        "partial_correlation_from_covariance", "filled_constant_direction", "study_partial_correlation",
        "jackknife_stability", "cross_cell_edge_table", "cross_cell_network"),
    "dense_moments": ("high_offsets", "DenseMomentArrays", "DenseMomentTensors"),
    "dictionaries": ("TokenizerConvention", "convention_named", "load_pickle_restricted",
        "save_pickle_atomic", "GeneformerDictionaries", "load_geneformer_dictionaries", "corpus_gene_keys",
        "normalized_counts", "gene_nonzero_medians", "build_corpus_dictionaries"),
    "edge_moments": ("EdgeMoments", "merge_edge_moments", "EdgeMomentAccumulator"),
    "feature_moments": ("FeatureMoments", "FeatureMomentAccumulator", "accumulate_feature_moments"),
    "model": ("SmallGeneformerConfig", "bert_config", "build_masked_lm", "mask_tokens", "TrainedGeneformer",
        "pick_device", "split_held_out", "length_bucketed_batch", "held_out_masks", "held_out_loss",
        "train_small_geneformer", "position_only_entropy", "training_report", "save_geneformer",
        "LoadedGeneformer", "load_checkpoint_weights", "load_geneformer"),
    "pair_moments": ("PairMomentHashMap",),
    "partial_correlation": ("triangle_pairs", "pcorr_triangle_cosine_shrunk_pinv",
        "pcorr_cosine_shrunk_pinv", "standardized_within_cell", "pcorr_cosine_shrunk_pinv_cell_z",
        "partial_correlation", "partial_correlation_triangle"),
    "tokens": ("TokenizedCells", "tokenize_cells"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)
