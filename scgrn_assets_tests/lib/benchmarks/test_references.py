"""The reference configuration (load_reference by format and species), ground truths and TF lists."""

from __future__ import annotations

import pytest

from scgrn_assets.lib.benchmarks.references import ReferenceSource, load_reference, load_tf_list, references_for_species
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.support.benchmarks import shared_file, write_string_v12


@pytest.mark.parametrize(("species", "n_tfs"), [("human", 1563), ("mouse", 1479)])
def test_beeline_tf_lists(species, n_tfs):
    tfs = load_tf_list(shared_file(f"beeline_networks/{species}-tfs.csv"))
    assert len(tfs) == n_tfs
    assert "TF" not in tfs


def test_load_reference_reads_string_v12_without_an_aliases_file(tmp_path):
    info, _, links = write_string_v12(tmp_path)
    source = ReferenceSource(name="STRING", format="string_v12", species="human",
                             files={"info": str(info), "links": str(links)}, options={"min_combined_score": 800})
    reference = load_reference(source, gene_symbols=["TP53", "MDM2", "CDKN1A"])
    assert set(zip(reference["source"], reference["target"])) == {("MDM2", "TP53"), ("CDKN1A", "MDM2")}


def test_load_reference_dispatches_by_format_and_filters_species(tmp_path):
    trrust_path = tmp_path / "trrust.tsv"
    trrust_path.write_text("A\tB\tActivation\t1\n")
    pairs_path = tmp_path / "truth.csv"
    pairs_path.write_text("Gene1,Gene2,Type\nA,B,+\nB,C,-\n")
    sources = [
        ReferenceSource(name="TRRUST", format="trrust", species="human", files={"edges": str(trrust_path)}),
        ReferenceSource(name="truth", format="edge_list", species="mouse", files={"edges": str(pairs_path)},
                        options={"sign_column": "Type"}),
    ]
    assert [source.name for source in references_for_species(sources, "Mouse")] == ["truth"]
    truth = load_reference(sources[1])
    assert set(zip(truth["source"], truth["target"], truth["sign"])) == {("A", "B", 1), ("B", "C", -1)}
    assert len(load_reference(sources[0])) == 1


def test_load_reference_without_path_or_url_says_what_to_add():
    source = ReferenceSource(name="STRING", format="string_v12", species="human", files={"info": "x", "aliases": "y"})
    # aliases are optional, links are not
    with pytest.raises(ScgrnInputError, match=r"STRING.*'links'.*urls\['links'\]"):
        load_reference(source)


@pytest.mark.parametrize("text, expected_edges, expected_signs", [
    ("Gene1,Gene2,Type\nA,B,+\nA,B,+\nB,C,-\nC,C,+\n", {("A", "B"), ("B", "C"), ("C", "C")}, {1, -1}),
    ("regulator,target,sign,weight\nA,B,+,1.0\nC,B,-,-0.5\n", {("A", "B"), ("C", "B")}, {1, -1}),
    ("tf\ttarget\tmor\nA\tB\t1\nA\tC\t-1\n", {("A", "B"), ("A", "C")}, {1, -1}),
    ("1,85\n1,3\n85,3\n", {("1", "85"), ("1", "3"), ("85", "3")}, {0}),
    ("A\tB\tActivation\t123\nA\tC\tRepression\t456\n", {("A", "B"), ("A", "C")}, {1, -1}),
])
def test_load_ground_truth_picks_the_reader_from_the_first_line(tmp_path, text, expected_edges, expected_signs):
    from scgrn_assets.lib.benchmarks.references import load_ground_truth

    path = tmp_path / "truth.csv"
    path.write_text(text)
    truth = load_ground_truth(path)
    assert set(zip(truth["source"], truth["target"])) == expected_edges
    assert set(truth["sign"]) == expected_signs
    assert truth["directed"].all() and (truth["reference"] == "truth").all()
