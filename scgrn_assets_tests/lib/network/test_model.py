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

TINY = SmallGeneformerConfig(n_layers=2, hidden_size=32, n_heads=2, intermediate_size=64, max_steps=12,
                             batch_size=8, max_train_length=24, min_loss_margin=None, seed=3)

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
    config = SmallGeneformerConfig(n_layers=1, hidden_size=32, n_heads=2, intermediate_size=64, max_steps=60,
                                   batch_size=8, learning_rate=3e-3, min_loss_margin=None, eval_every=60, seed=0)
    progress = []
    trained = train_small_geneformer(cells, dictionaries, config, device="cpu",
                                     progress=lambda step, total, loss, **_: progress.append((step, total, loss)))
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
    from scgrn_assets.lib.network.model import TrainedGeneformer

    def trained_with(held_out_curve, best_step):
        return TrainedGeneformer(None, dictionaries, np.full(50, 9.0), np.asarray(held_out_curve, dtype=float),
                                 expected, best_step=best_step)

    # The gate reads the held-out loss of the weights kept (the best evaluation), never the training loss.
    report = training_report(trained_with([[25, 9.0], [50, expected - 0.5], [75, expected - 0.4]], 50), 0.25)
    assert report["final_loss"] == pytest.approx(expected - 0.5) and report["final_training_loss"] == 9.0
    assert report["margin"] == pytest.approx(0.5) and report["beats_position_only"] is True
    assert training_report(trained_with([[25, expected]], 25), 0.25)["beats_position_only"] is False
    assert training_report(trained_with([[25, expected]], 25), None)["beats_position_only"] is None


def module_corpus(n_cells=400, seed=0):
    """Cells that are a random order of one of two gene modules (8 genes each): a masked gene is not predictable
    from its position (every gene at every position), but is from the other genes in the cell (its module)."""
    rng = np.random.default_rng(seed)
    modules = [np.arange(2, 10), np.arange(10, 18)]
    cells = [rng.permutation(modules[rng.integers(2)]) for _ in range(n_cells)]
    token_dictionary = {"<pad>": 0, "<mask>": 1} | {f"G{token}": token for token in range(2, 18)}
    dictionaries = GeneformerDictionaries(token_dictionary, {}, V1)
    offsets = np.r_[0, np.cumsum([len(cell) for cell in cells])]
    return TokenizedCells(np.concatenate(cells).astype(np.int32), offsets, V1), dictionaries


def brute_force_held_out_loss(model, batches):
    """Mean over masked tokens of -log softmax, one cell and one token at a time, in numpy."""
    losses = []
    with torch.no_grad():
        for masked, attention_mask, labels in batches:
            for row in range(masked.shape[0]):
                logits = model(input_ids=masked[row:row + 1], attention_mask=attention_mask[row:row + 1]).logits[0]
                logits = logits.double().numpy()
                for position in np.flatnonzero(labels[row].numpy() != IGNORE_LABEL):
                    row_logits = logits[position]
                    log_norm = np.log(np.exp(row_logits - row_logits.max()).sum()) + row_logits.max()
                    losses.append(log_norm - row_logits[labels[row, position].item()])
    return float(np.mean(losses))


def test_training_stops_at_the_held_out_gate_and_keeps_the_best_weights():
    from scgrn_assets.lib.network.model import held_out_loss, held_out_masks, split_held_out, training_report

    cells, dictionaries = module_corpus()
    config = SmallGeneformerConfig(n_layers=1, hidden_size=32, n_heads=2, intermediate_size=64, max_steps=600,
                                   batch_size=16, learning_rate=3e-3, eval_every=20, min_loss_margin=0.25,
                                   held_out_cells=40, seed=0)
    trained = train_small_geneformer(cells, dictionaries, config, device="cpu")
    report = training_report(trained, config.min_loss_margin)
    # Every gene at every position: the position-only entropy is about log(16).
    assert report["position_only_entropy"] == pytest.approx(np.log(16), abs=0.05)
    assert report["beats_position_only"] is True and report["margin"] >= 0.25
    assert report["cleared_at_step"] is not None and report["n_steps"] < config.max_steps
    assert report["n_held_out_cells"] == 20  # 5% of 400 cells, under the cap of 40
    steps, losses = trained.held_out_curve.T
    # Stopped because the held-out loss stopped improving after the gate (patience 1): the last evaluation
    # gained less than min_improvement on every earlier one, and it came after the gate was cleared.
    assert steps[-1] == report["n_steps"] > report["cleared_at_step"]
    assert losses[-1] > losses[:-1].min() - config.min_improvement
    assert report["best_step"] == steps[np.argmin(losses)] and report["final_loss"] == losses.min()
    # The kept weights are the best evaluation's: recomputing the held-out loss, token by token, gives it back.
    _train, held_out = split_held_out(cells.n_cells, config.held_out_cells, config.seed)
    batches = held_out_masks(cells, held_out, dictionaries, config.max_train_length, seed=config.seed)
    assert held_out_loss(trained.model, batches, torch.device("cpu")) == pytest.approx(losses.min(), abs=1e-5)
    assert brute_force_held_out_loss(trained.model, batches) == pytest.approx(losses.min(), abs=1e-4)


def test_a_model_that_cannot_beat_position_trains_to_the_ceiling_and_fails_the_gate():
    from scgrn_assets.lib.network.model import training_report

    # Every cell is the same ranking: position predicts every token, nothing can beat it by 0.25 nats.
    genes = np.arange(2, 18, dtype=np.int32)
    cells = TokenizedCells(np.tile(genes, 200), np.arange(201) * len(genes), V1)
    dictionaries = GeneformerDictionaries({"<pad>": 0, "<mask>": 1} | {f"G{t}": t for t in range(2, 18)}, {}, V1)
    config = SmallGeneformerConfig(n_layers=1, hidden_size=16, n_heads=2, intermediate_size=32, max_steps=40,
                                   batch_size=8, eval_every=10, min_loss_margin=0.25, seed=0)
    trained = train_small_geneformer(cells, dictionaries, config, device="cpu")
    report = training_report(trained, config.min_loss_margin)
    assert report["position_only_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert report["n_steps"] == 40 and report["cleared_at_step"] is None and report["beats_position_only"] is False


def test_held_out_cells_are_never_trained_on_and_batches_group_similar_lengths():
    from scgrn_assets.lib.network.model import length_bucketed_batch, split_held_out

    train, held_out = split_held_out(1000, 256, seed=3)
    assert len(held_out) == 50 and len(train) == 950 and not set(train) & set(held_out)
    assert split_held_out(1, 256, seed=0)[1].size == 0 and split_held_out(2, 256, seed=0)[1].size == 1
    lengths = np.random.default_rng(0).integers(5, 400, size=2000)
    order = np.argsort(lengths, kind="stable")
    rng = np.random.default_rng(1)
    spreads, drawn = [], np.zeros(2000)
    for _ in range(2000):
        batch = length_bucketed_batch(order, 16, rng)
        spreads.append(np.ptp(lengths[batch]))
        np.add.at(drawn, batch, 1)
    # A window of 64 cells in length order spans ~13 of the 5-400 range; a random batch spans ~370.
    assert np.median(spreads) < 30
    # Every cell is drawn, and the middle ones about equally often (16 per batch x 2000 batches / 2000 cells).
    assert drawn.min() > 0 and abs(drawn[order[200:1800]].mean() - 16) < 1.5
