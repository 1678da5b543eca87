"""The demo Geneformer: masking, training, save_pretrained → reload gives the same attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.model import (
    IGNORE_LABEL,
    SmallGeneformerConfig,
    build_masked_lm,
    load_geneformer,
    mask_tokens,
    save_geneformer,
    train_small_geneformer,
)
from scgrn_assets.lib.network.dictionaries import V1, V2, GeneformerDictionaries
from scgrn_assets.lib.network.tokens import TokenizedCells

TINY = SmallGeneformerConfig(n_layers=2, hidden_size=32, n_heads=2, intermediate_size=64, n_steps=12,
                             batch_size=8, max_train_length=24, seed=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def tiny_corpus(convention=V2, n_cells=40, n_genes=30, seed=0):
    """Cells of 5-20 distinct gene tokens; V2 cells are wrapped in <cls>/<eos>."""
    rng = np.random.default_rng(seed)
    token_dictionary = {name: token_id for token_id, name in enumerate(convention.special_tokens)}
    for gene in range(n_genes):
        token_dictionary[f"ENSG{gene:05d}"] = len(token_dictionary)
    dictionaries = GeneformerDictionaries(token_dictionary, {key: 1.0 for key in list(token_dictionary)[4:]},
                                          convention)
    first_gene = len(convention.special_tokens)
    cells = []
    for _cell in range(n_cells):
        genes = rng.choice(np.arange(first_gene, first_gene + n_genes), size=rng.integers(5, 21), replace=False)
        cells.append([2, *genes, 3] if convention.add_cls_eos else list(genes))
    offsets = np.concatenate([[0], np.cumsum([len(cell) for cell in cells])])
    return TokenizedCells(np.concatenate(cells).astype(np.int32), offsets, convention), dictionaries


def test_mask_tokens_masks_only_genes_in_bert_proportions():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 500, (200, 300))
    input_ids[:, 0] = 2
    input_ids[:, -1] = 3
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 250:] = 0
    special = torch.tensor([0, 1, 2, 3])
    masked, labels = mask_tokens(input_ids, attention_mask, special, mask_token_id=1, vocab_size=500,
                                 mask_probability=0.15, generator=generator)
    picked = labels != IGNORE_LABEL
    assert torch.equal(labels[picked], input_ids[picked])
    assert not picked[:, 0].any() and not picked[:, 250:].any()
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    assert picked.sum() / eligible.sum() == pytest.approx(0.15, abs=0.01)
    became_mask = (masked == 1) & picked
    unchanged = (masked == input_ids) & picked
    assert became_mask.sum() / picked.sum() == pytest.approx(0.8, abs=0.02)
    assert unchanged.sum() / picked.sum() == pytest.approx(0.1 + 0.1 / 496, abs=0.02)
    assert torch.equal(masked[~picked], input_ids[~picked])
    assert not torch.isin(masked[picked & (masked != 1)], special).any()


def test_training_reduces_loss_on_a_learnable_corpus():
    # Every cell is the same ranking: a masked gene is predictable from its position.
    genes = np.arange(4, 20, dtype=np.int32)
    cells = TokenizedCells(np.tile(genes, 50), np.arange(51) * len(genes), V1)
    token_dictionary = {"<pad>": 0, "<mask>": 1} | {f"G{token}": token for token in range(2, 20)}
    dictionaries = GeneformerDictionaries(token_dictionary, {}, V1)
    config = SmallGeneformerConfig(n_layers=1, hidden_size=32, n_heads=2, intermediate_size=64, n_steps=60,
                                   batch_size=8, learning_rate=3e-3, seed=0)
    progress = []
    trained = train_small_geneformer(cells, dictionaries, config, device="cpu",
                                     progress=lambda step, total, loss: progress.append((step, total, loss)))
    assert trained.loss_curve.shape == (60,)
    assert np.isfinite(trained.loss_curve).all()
    assert trained.loss_curve[-10:].mean() < 0.5 * trained.loss_curve[:5].mean()
    assert progress[-1][:2] == (60, 60) and len(progress) == 60
    assert not trained.model.training


def eager_attention(model, input_ids, attention_mask):
    with torch.no_grad():
        output = model.bert(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    return output.attentions


def test_saved_model_reloads_with_the_same_attention(tmp_path):
    cells, dictionaries = tiny_corpus()
    trained = train_small_geneformer(cells, dictionaries, TINY, device="cpu")
    directory = save_geneformer(trained, tmp_path / "geneformer_model")
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    np.testing.assert_array_equal(np.load(directory / "loss_curve.npy"), trained.loss_curve)

    loaded = load_geneformer(directory, device="cpu")
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.dictionaries.token_dictionary == dictionaries.token_dictionary
    assert loaded.dictionaries.convention is V2
    input_ids, attention_mask = (torch.as_tensor(array) for array in cells.padded(np.arange(10)))
    before = eager_attention(trained.model, input_ids, attention_mask)
    after = eager_attention(loaded.model, input_ids, attention_mask)
    assert len(after) == TINY.n_layers and after[-1].shape == (10, TINY.n_heads, *input_ids.shape[1:2] * 2)
    for layer_before, layer_after in zip(before, after):
        torch.testing.assert_close(layer_after, layer_before, rtol=0, atol=1e-6)
    # Real attention, not a constant: rows differ between cells.
    assert not torch.allclose(after[-1][0, :, 0], after[-1][1, :, 0])


def test_save_replaces_an_existing_model(tmp_path):
    cells, dictionaries = tiny_corpus(V1)
    first = train_small_geneformer(cells, dictionaries, TINY, device="cpu")
    save_geneformer(first, tmp_path / "model")
    second = build_masked_lm(dictionaries.vocab_size, V1.model_input_size, TINY)
    save_geneformer(type(first)(second, dictionaries, np.zeros(1)), tmp_path / "model")
    reloaded = load_geneformer(tmp_path / "model", device="cpu")
    torch.testing.assert_close(reloaded.model.bert.embeddings.word_embeddings.weight,
                               second.bert.embeddings.word_embeddings.weight)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_load_geneformer_names_the_folder_when_not_a_checkpoint(tmp_path):
    with pytest.raises(ScgrnInputError, match="config.json"):
        load_geneformer(tmp_path)


def test_training_needs_cells():
    _cells, dictionaries = tiny_corpus()
    empty = TokenizedCells(np.zeros(0, np.int32), np.zeros(1, np.int64), V2)
    with pytest.raises(ScgrnInputError, match="no tokenized cells"):
        train_small_geneformer(empty, dictionaries, TINY)


def test_position_only_entropy_equals_a_per_position_scipy_entropy():
    import scipy.stats

    from scgrn_assets.lib.network.model import position_only_entropy, training_report
    from scgrn_assets.lib.network.dictionaries import V2, GeneformerDictionaries
    from scgrn_assets.lib.network.tokens import TokenizedCells

    rng = np.random.default_rng(4)
    dictionaries = GeneformerDictionaries(token_dictionary={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                            **{f"G{i}": 4 + i for i in range(12)}},
                                          gene_median={f"G{i}": 1.0 for i in range(12)}, convention=V2)
    cells = [np.r_[2, 4 + rng.choice(12, size=n, replace=False), 3] for n in rng.integers(1, 10, size=40)]
    tokenized = TokenizedCells(np.concatenate(cells).astype(np.int32), np.r_[0, np.cumsum([len(c) for c in cells])],
                               V2)
    max_length = 6
    by_position: dict[int, list[int]] = {}
    for cell in cells:
        for position, token in enumerate(cell[:max_length]):
            if token >= 4:
                by_position.setdefault(position, []).append(token)
    total = sum(len(tokens) for tokens in by_position.values())
    expected = sum(len(tokens) / total * scipy.stats.entropy(np.unique(tokens, return_counts=True)[1])
                   for tokens in by_position.values())
    assert position_only_entropy(tokenized, dictionaries, max_length) == pytest.approx(expected, rel=1e-12)
    report = training_report(np.r_[np.full(30, 9.0), np.full(20, expected - 0.5)], expected, min_margin=0.25)
    assert report["margin"] == pytest.approx(0.5) and report["beats_position_only"] is True
    assert training_report(np.full(20, expected), expected, min_margin=0.25)["beats_position_only"] is False
