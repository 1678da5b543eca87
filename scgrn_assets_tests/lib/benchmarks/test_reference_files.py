"""Reference loaders: real files under ../shared/data/reference (row counts from their SOURCE.md), small written files."""

from __future__ import annotations

import pandas as pd
import pytest

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.benchmarks.reference_files import (
    REFERENCE_COLUMNS,
    load_edge_list,
    load_regulon_table,
    load_string_v12,
    load_trrust,
    normalise_reference,
)
from scgrn_assets_tests.support.benchmarks import shared_file, write_string_v12


def assert_normalised(reference: pd.DataFrame, name: str) -> None:
    assert list(reference.columns) == REFERENCE_COLUMNS
    assert (reference["reference"] == name).all()
    assert not reference.duplicated(["source", "target"]).any()
    assert set(reference["sign"].unique()) <= {-1, 0, 1}


# --- real files: counts stated in each folder's SOURCE.md -------------------------------------


@pytest.mark.parametrize(
    ("file_name", "n_pairs", "n_tfs", "n_targets", "n_self_loops"),
    [("trrust_rawdata.human.tsv", 8427, 795, 2492, 24), ("trrust_rawdata.mouse.tsv", 6490, 827, 2092, 28)],
)
def test_trrust_raw_files_give_the_stated_unique_pairs(file_name, n_pairs, n_tfs, n_targets, n_self_loops):
    reference = load_trrust(shared_file(f"trrust_v2/{file_name}"))
    assert_normalised(reference, "TRRUST")
    assert len(reference) == n_pairs
    assert reference["source"].nunique() == n_tfs
    assert reference["target"].nunique() == n_targets
    assert (reference["source"] == reference["target"]).sum() == n_self_loops
    assert reference["directed"].all()


def test_trrust_modes_become_signs_and_conflicts_become_unknown():
    raw = pd.read_csv(shared_file("trrust_v2/trrust_rawdata.human.tsv"), sep="\t", header=None,
                      names=["tf", "target", "mode", "pmids"])
    modes_per_pair = raw.groupby(["tf", "target"])["mode"].agg(frozenset)
    expected_sign = modes_per_pair.map(
        lambda modes: 0 if {"Activation", "Repression"} <= modes
        else 1 if "Activation" in modes else -1 if "Repression" in modes else 0
    )
    reference = load_trrust(shared_file("trrust_v2/trrust_rawdata.human.tsv")).set_index(["source", "target"])
    assert reference["sign"].sort_index().tolist() == expected_sign.sort_index().tolist()


@pytest.mark.parametrize(
    ("species", "n_pairs", "n_genes"), [("human", 99149, 8806), ("mouse", 78567, 7771)]
)
def test_beeline_string_network_gives_the_stated_unique_pairs(species, n_pairs, n_genes):
    path = shared_file(f"beeline_networks/Networks/{species}/STRING-network.csv")
    reference = load_edge_list(path, name="STRING")
    assert_normalised(reference, "STRING")
    assert len(reference) == n_pairs
    assert len(set(reference["source"]) | set(reference["target"])) == n_genes
    undirected = load_edge_list(path, name="STRING", directed=False)
    assert not undirected["directed"].any()
    assert (undirected["source"] <= undirected["target"]).all()
    unordered_pairs = {frozenset(pair) for pair in zip(reference["source"], reference["target"])}
    assert len(undirected) == len(unordered_pairs)


@pytest.mark.parametrize(
    ("relative", "n_edges", "n_sources"),
    [
        ("beeline_networks/Networks/human/HepG2-ChIP-seq-network.csv", 342862, 84),
        ("beeline_networks/Networks/mouse/mDC-ChIP-seq-network.csv", 30658, 36),
        ("beeline_networks/Networks/mouse/mESC-lofgof-network.csv", 104201, 55),
        ("sergio/data_sets/De-noised_100G_3T_300cPerT_dynamics_8_DS8/gt_GRN.csv", 137, 10),
        ("sergio/data_sets/De-noised_400G_9T_300cPerT_5_DS2/gt_GRN.csv", 1155, None),
    ],
)
def test_other_edge_lists_give_the_stated_counts(relative, n_edges, n_sources):
    reference = load_edge_list(shared_file(relative), name="reference")
    assert len(reference) == n_edges
    if n_sources is not None:
        assert reference["source"].nunique() == n_sources


def test_beeline_gsd_ground_truth_has_76_signed_non_self_edges():
    reference = load_edge_list(shared_file("beeline_example_gsd/GroundTruthNetwork.csv"), name="GSD", sign_column="Type")
    assert len(reference) == 79
    assert (reference["source"] != reference["target"]).sum() == 76
    raw = pd.read_csv(shared_file("beeline_example_gsd/GroundTruthNetwork.csv")).drop_duplicates(["Gene1", "Gene2"])
    expected = dict(zip(zip(raw["Gene1"], raw["Gene2"]), raw["Type"].map({"+": 1, "-": -1})))
    assert dict(zip(zip(reference["source"], reference["target"]), reference["sign"])) == expected


def test_krumsiek11_derived_edges_keep_case_and_signs():
    reference = load_edge_list(shared_file("krumsiek11/krumsiek11_edges_derived.csv"), name="krumsiek11",
                               sign_column="sign")
    assert len(reference) == 30
    assert (reference["source"] != reference["target"]).sum() == 26
    assert "Pu.1" in set(reference["source"])
    raw = pd.read_csv(shared_file("krumsiek11/krumsiek11_edges_derived.csv"))
    assert (reference["sign"] == -1).sum() == (raw["weight"] < 0).sum()


# --- small files written here -----------------------------------------------------------------


def test_dorothea_table_filters_confidence_and_reads_mode_of_regulation(tmp_path):
    path = tmp_path / "dorothea_hs.tsv"
    path.write_text("tf\tconfidence\ttarget\tmor\nSOX9\tA\tAMH\t1\nSOX9\tE\tFOXL2\t1\nFOXL2\tB\tSOX9\t-1\n"
                    "FOXL2\tC\tSOX9\t-1\n")
    reference = load_regulon_table(path, name="DoRothEA", confidence_levels="ABC")
    assert_normalised(reference, "DoRothEA")
    assert set(zip(reference["source"], reference["target"], reference["sign"])) == {("SOX9", "AMH", 1), ("FOXL2", "SOX9", -1)}


def test_collectri_table_uses_source_and_weight(tmp_path):
    path = tmp_path / "collectri.csv"
    path.write_text("source,target,weight,PMID\nMYC,TERT,1,123;456\nTP53,MYC,-1,789\nMYC,MYC,1,1\n")
    reference = load_regulon_table(path, name="CollecTRI")
    assert set(zip(reference["source"], reference["target"], reference["sign"])) == {
        ("MYC", "TERT", 1), ("TP53", "MYC", -1), ("MYC", "MYC", 1)}


def test_regulon_table_without_known_columns_names_the_file(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("a,b\nx,y\n")
    with pytest.raises(ScgrnInputError, match="odd.csv"):
        load_regulon_table(path, name="odd")


def test_plain_two_column_list_without_header(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Gata1\tKlf1\nGata1\tKlf1\nSpi1\tCebpa\n")
    reference = load_edge_list(path, name="pairs")
    assert set(zip(reference["source"], reference["target"])) == {("Gata1", "Klf1"), ("Spi1", "Cebpa")}
    assert (reference["sign"] == 0).all()


def test_trrust_conflicting_modes_and_header_line(tmp_path):
    path = tmp_path / "trrust.tsv"
    path.write_text("TF\tgene_symbol\tinteraction\tposition\n"
                    "A\tB\tActivation\t1\nA\tB\tRepression\t2\nA\tC\tActivation\t3\nA\tC\tUnknown\t4\nC\tD\tRepression\t5\n")
    reference = load_trrust(path).set_index(["source", "target"])["sign"].to_dict()
    assert reference == {("A", "B"): 0, ("A", "C"): 1, ("C", "D"): -1}


def test_trrust_with_wrong_columns_names_file_and_fix(tmp_path):
    path = tmp_path / "not_trrust.tsv"
    path.write_text("A\tB\nC\tD\n")
    with pytest.raises(ScgrnInputError, match=r"not_trrust\.tsv.*expected 4"):
        load_trrust(path)


def test_missing_file_names_study_and_file(tmp_path):
    with pytest.raises(ScgrnInputError, match=r"TRRUST.*absent\.tsv.*not found"):
        load_trrust(tmp_path / "absent.tsv", study="TRRUST")


def test_string_v12_threshold_and_preferred_names(tmp_path):
    info, aliases, links = write_string_v12(tmp_path)
    reference = load_string_v12(info, links, aliases)
    assert_normalised(reference, "STRING")
    assert not reference["directed"].any()
    pairs = {frozenset(pair) for pair in zip(reference["source"], reference["target"])}
    assert pairs == {frozenset({"TP53", "MDM2"}), frozenset({"TP53", "CDKN1A"}), frozenset({"MDM2", "CDKN1A"})}
    lenient = load_string_v12(info, links, min_combined_score=600)
    assert len(lenient) == 4


def test_string_v12_maps_data_symbols_through_preferred_names_then_unambiguous_aliases(tmp_path):
    info, aliases, links = write_string_v12(tmp_path)
    # HDM2 is an alias of MDM2 (no preferred name HDM2); P21 an alias of CDKN1A; CIP1 is ambiguous (P3 and P4)
    reference = load_string_v12(info, links, aliases, gene_symbols=["TP53", "HDM2", "P21", "CIP1"])
    pairs = {frozenset(pair) for pair in zip(reference["source"], reference["target"])}
    assert pairs == {frozenset({"TP53", "HDM2"}), frozenset({"TP53", "P21"}), frozenset({"HDM2", "P21"})}
    without_aliases = load_string_v12(info, links, gene_symbols=["TP53", "MDM2", "HDM2"])
    assert set(zip(without_aliases["source"], without_aliases["target"])) == {("MDM2", "TP53")}


def test_normalise_reference_merges_orientations_of_undirected_edges():
    edges = pd.DataFrame({"source": ["B", "A", "C"], "target": ["A", "B", "A"], "sign": [1, 1, -1]})
    reference = normalise_reference(edges, name="toy", directed=False)
    assert set(zip(reference["source"], reference["target"], reference["sign"])) == {("A", "B", 1), ("A", "C", -1)}


