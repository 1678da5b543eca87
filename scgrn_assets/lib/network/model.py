"""Geneformer models: load a published checkpoint, or train a small one on the corpus.

Both paths give a ``transformers`` BERT with eager attention (the default sdpa kernel
returns no attention weights) plus the dictionaries it was trained with. A model trained
here is written with ``save_pretrained`` next to its dictionaries, so it reloads exactly
like a published checkpoint through :func:`load_geneformer`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.network.dictionaries import (MASK_TOKEN, PAD_TOKEN, GeneformerDictionaries, convention_named,
                                                   load_geneformer_dictionaries)
from scgrn_assets.lib.network.tokens import TokenizedCells
from scgrn_assets.lib.progress import Progress, report

IGNORE_LABEL = -100
"""Label value the masked-LM loss skips (positions that were not masked)."""


@dataclass(frozen=True)
class SmallGeneformerConfig:
    """Architecture and training settings of a model trained here (Geneformer's BERT, scaled down): the one
    place their defaults live (:class:`scgrn_assets.lib.benchmarks.pipeline.GrnPathSettings` and the Dagster
    ``geneformer`` resource read theirs from here).

    Geneformer V1 is 6 layers, 256 hidden, 4 heads, intermediate 512, ReLU, dropout 0.02. Training stops at
    the gate, not at a step count: once the masked-LM loss on held-out cells is ``min_loss_margin`` nats
    below the position-only entropy and has stopped improving (``patience`` evaluations without a gain of
    ``min_improvement``), or at ``max_steps``.
    """

    n_layers: int = 4
    hidden_size: int = 128
    n_heads: int = 4
    intermediate_size: int = 256
    dropout: float = 0.02
    mask_probability: float = 0.3
    """Share of gene tokens picked per training cell (BERT's 80/10/10 on them). Geneformer used 0.15; twice
    that reached the held-out gate in 550 steps instead of 900 on the demo (more supervised tokens per step,
    as Wettig et al. 2023 found for language); the held-out evaluation always masks 0.15."""
    max_steps: int = 2000
    """Ceiling on training steps; the held-out gate usually stops training well before it."""
    batch_size: int = 16
    max_train_length: int = 256
    """Tokens per cell seen in training: the top-ranked ones, as many as the attention step reads."""
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.001
    min_loss_margin: float | None = 0.25
    """Nats the held-out masked-LM loss must be below the position-only entropy (None: no gate)."""
    eval_every: int = 50
    """Steps between held-out evaluations (each costs about five training steps)."""
    held_out_cells: int = 256
    """Cells kept out of training to measure the gate on (at most; 5% of a small corpus)."""
    patience: int = 1
    """Evaluations after the gate without a gain of ``min_improvement`` before training stops."""
    min_improvement: float = 0.01
    length_bucketing: bool = True
    """Batch cells of similar length together (less padding; :func:`length_bucketed_batch`)."""
    seed: int = 0


def bert_config(
    vocab_size: int,
    max_position_embeddings: int,
    config: SmallGeneformerConfig = SmallGeneformerConfig(),
    pad_token_id: int = 0,
) -> BertConfig:
    """A ``BertConfig`` with Geneformer's choices (ReLU, eps 1e-12, eager attention)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.intermediate_size,
        hidden_act="relu",
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=max_position_embeddings,
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        pad_token_id=pad_token_id,
        attn_implementation="eager",
    )


def build_masked_lm(
    vocab_size: int,
    max_position_embeddings: int,
    config: SmallGeneformerConfig = SmallGeneformerConfig(),
    pad_token_id: int = 0,
) -> BertForMaskedLM:
    """A randomly initialised Geneformer-style BERT masked-LM (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    return BertForMaskedLM(bert_config(vocab_size, max_position_embeddings, config, pad_token_id))


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_token_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mask_probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``mask_probability`` of gene tokens; 80% ``<mask>``, 10% random, 10% kept.

    Parameters
    ----------
    input_ids, attention_mask
        Shape (n_batch, length), int64.
    special_token_ids
        Ids never masked nor drawn as random replacements (pad, mask, cls, eos).

    Returns
    -------
    masked_input_ids, labels
        Shape (n_batch, length); ``labels`` is the original id where a token was picked,
        ``IGNORE_LABEL`` elsewhere.
    """
    is_gene = attention_mask.bool() & ~torch.isin(input_ids, special_token_ids)
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    picked = is_gene & (draws < mask_probability)
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_LABEL))
    # Reuse the same uniform draw to split the picked tokens 80/10/10.
    relative = draws / mask_probability
    to_mask = picked & (relative < 0.8)
    to_random = picked & (relative >= 0.8) & (relative < 0.9)
    gene_ids = torch.arange(vocab_size, device=input_ids.device)
    gene_ids = gene_ids[~torch.isin(gene_ids, special_token_ids)]
    random_choice = gene_ids[torch.randint(len(gene_ids), input_ids.shape, generator=generator,
                                           device=input_ids.device)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_choice, masked)
    return masked, labels


@dataclass
class TrainedGeneformer:
    """A model trained here, with what it needs to be saved and reused.

    Attributes
    ----------
    model
        The trained masked-LM (eval mode, on CPU): the weights of its best held-out evaluation.
    dictionaries
        Token/median dictionaries the cells were encoded with.
    loss_curve
        Shape (n_steps,), float64: training masked-LM cross-entropy (nats per masked token) per step.
    held_out_curve
        Shape (n_evaluations, 2): (step, masked-LM loss on the held-out cells) at each evaluation.
    position_only_entropy
        The gate's baseline (:func:`position_only_entropy` of the training cells), nats; NaN if not computed.
    cleared_at_step
        First evaluation step whose held-out loss cleared the gate (None: never, or no gate).
    best_step
        The evaluation step whose weights the model holds.
    n_held_out_cells
        Cells the held-out loss was measured on (0: too few cells to hold any out; measured on training cells).
    """

    model: BertForMaskedLM
    dictionaries: GeneformerDictionaries
    loss_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))
    held_out_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    position_only_entropy: float = float("nan")
    cleared_at_step: int | None = None
    best_step: int | None = None
    n_held_out_cells: int = 0
    seconds: float = float("nan")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def split_held_out(n_cells: int, max_held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training cells, held-out cells): at most ``max_held_out`` and 5% of the cells are held out, at least
    one when there are two or more cells; none (train on all, evaluate on the training cells) below that."""
    rng = np.random.default_rng([seed, 1])
    n_held_out = 0 if n_cells < 2 else int(min(max_held_out, max(1, round(0.05 * n_cells))))
    order = rng.permutation(n_cells)
    return np.sort(order[n_held_out:]), np.sort(order[:n_held_out])


def length_bucketed_batch(sorted_cells: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A batch of cells of similar length: an anchor cell drawn uniformly from ``sorted_cells`` (cells ordered
    by length), the rest uniformly from the ``4 * batch_size`` cells around it in that order (so every cell is
    drawn about equally often; the few at either end of the order somewhat less).

    Padding to the longest cell of a random batch spends most of a step on pad tokens when short
    (droplet) and long (plate) cells mix; near-neighbours in length pad little."""
    n = len(sorted_cells)
    window = min(n, 4 * batch_size)
    anchor = int(rng.integers(0, n))
    start = min(max(0, anchor - window // 2), n - window)
    return sorted_cells[start + rng.integers(0, window, size=batch_size)]


EVAL_MASK_PROBABILITY = 0.15
"""Share of gene tokens masked in the held-out evaluation (Geneformer's), whatever training uses."""


def held_out_masks(cells: TokenizedCells, held_out: np.ndarray, dictionaries: GeneformerDictionaries,
                   max_length: int, mask_probability: float = EVAL_MASK_PROBABILITY,
                   seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Fixed evaluation batches of the held-out cells: ``mask_probability`` of each cell's gene tokens
    replaced by ``<mask>`` (all of them, no 80/10/10: a kept token would be free to predict), at least one
    per cell, the same masks at every evaluation so the curve moves only with the model."""
    generator = torch.Generator().manual_seed(seed + 1)
    special_ids = torch.as_tensor(dictionaries.special_token_ids)
    mask_id = dictionaries.token_dictionary[MASK_TOKEN]
    batches = []
    # Sorted by length, in batches of 32: little padding, and evaluation memory stays small.
    order = held_out[np.argsort(cells.lengths[held_out], kind="stable")]
    for start in range(0, len(order), 32):
        input_ids, attention_mask = (torch.as_tensor(a) for a in cells.padded(order[start:start + 32],
                                                                               max_length=max_length))
        is_gene = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
        draws = torch.rand(input_ids.shape, generator=generator)
        picked = is_gene & (draws < mask_probability)
        # A short cell may draw no mask: then its lowest draw is masked, so every cell counts.
        lowest = torch.where(is_gene, draws, torch.full_like(draws, 2.0)).argmin(dim=1, keepdim=True)
        picked |= torch.zeros_like(picked).scatter_(1, lowest, True) & is_gene
        labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_LABEL))
        masked = torch.where(picked, torch.full_like(input_ids, mask_id), input_ids)
        batches.append((masked, attention_mask, labels))
    return batches


def held_out_loss(model: BertForMaskedLM, batches: list[tuple[torch.Tensor, ...]], device: torch.device) -> float:
    """Masked-LM cross-entropy (nats per masked token, token-weighted) of ``model`` on fixed batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for masked, attention_mask, labels in batches:
            logits = model(input_ids=masked.to(device), attention_mask=attention_mask.to(device)).logits
            labels = labels.to(device)
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                             labels.reshape(-1), ignore_index=IGNORE_LABEL,
                                                             reduction="sum"))
            count += int((labels != IGNORE_LABEL).sum())
    model.train(was_training)
    return total / count if count else float("nan")


def train_small_geneformer(
    cells: TokenizedCells,
    dictionaries: GeneformerDictionaries,
    config: SmallGeneformerConfig = SmallGeneformerConfig(),
    *,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> TrainedGeneformer:
    """Train a small Geneformer-architecture BERT masked-LM on tokenized cells, to the gate.

    A few cells (:func:`split_held_out`) never enter training; every ``config.eval_every`` steps the
    masked-LM loss on them (:func:`held_out_loss`) is compared with the position-only entropy of the
    training cells (:func:`position_only_entropy`). Training stops once that loss is
    ``config.min_loss_margin`` nats below the entropy (the gate) and has not improved by
    ``config.min_improvement`` for ``config.patience`` evaluations, or at ``config.max_steps``; the
    model keeps the weights of its best evaluation. The noisy training loss is not the criterion.

    Batches are cells drawn uniformly with replacement (seeded; of similar length when
    ``config.length_bucketing``), each truncated to its ``config.max_train_length`` top-ranked tokens.
    AdamW, linear warm-up over ``config.warmup_steps``, then a constant learning rate (the stopping step
    is not known in advance, so no schedule can decay towards it).

    Parameters
    ----------
    cells
        Tokenized corpus (:func:`scgrn_assets.lib.network.tokens.tokenize_cells`).
    dictionaries
        The dictionaries ``cells`` were encoded with (vocabulary and special tokens).
    device
        Default: the first CUDA GPU when present (bf16 autocast there), else CPU.
    progress
        Called as ``progress(step, max_steps, loss=..., held_out_loss=..., margin=...)`` after every step
        (the held-out figures are those of the latest evaluation).
    """
    import copy
    import time

    if cells.n_cells == 0:
        raise ScgrnInputError("no tokenized cells to train on", fix="check the corpus and its gene dictionary")
    started = time.perf_counter()
    device = pick_device(device)
    max_length = min(config.max_train_length, dictionaries.convention.model_input_size)
    train_cells, held_out = split_held_out(cells.n_cells, config.held_out_cells, config.seed)
    evaluate_on = held_out if len(held_out) else train_cells
    entropy = position_only_entropy(cells.subset(train_cells), dictionaries, max_length)
    eval_batches = held_out_masks(cells, evaluate_on, dictionaries, max_length, seed=config.seed)

    model = build_masked_lm(dictionaries.vocab_size, dictionaries.convention.model_input_size, config,
                            dictionaries.token_dictionary[PAD_TOKEN]).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    special_ids = torch.as_tensor(dictionaries.special_token_ids, device=device)
    mask_id = dictionaries.token_dictionary[MASK_TOKEN]
    sorted_cells = train_cells[np.argsort(cells.lengths[train_cells], kind="stable")]
    # bf16 autocast halves the GPU's work; on CPU it is slower than float32 for models this small.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    loss_curve: list[float] = []
    evaluations: list[tuple[int, float]] = []
    best_loss, best_step, best_state, cleared_at = math.inf, None, None, None
    # "Stopped improving" is measured from the last loss that was a real gain (at least min_improvement), so
    # a run of small gains that add up still counts as improving; the count starts when the gate is cleared.
    reference_loss, stale = math.inf, 0
    margin = float("nan")
    for step in range(1, config.max_steps + 1):
        batch = (length_bucketed_batch(sorted_cells, config.batch_size, rng) if config.length_bucketing
                 else train_cells[rng.integers(0, len(train_cells), size=config.batch_size)])
        input_ids, attention_mask = (torch.as_tensor(array, device=device)
                                     for array in cells.padded(batch, max_length=max_length))
        masked_ids, labels = mask_tokens(input_ids, attention_mask, special_ids, mask_id,
                                         dictionaries.vocab_size, config.mask_probability, generator)
        if (labels != IGNORE_LABEL).any():
            with autocast:
                output = model(input_ids=masked_ids, attention_mask=attention_mask, labels=labels)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_curve.append(float(output.loss.detach()))
        else:
            # A batch of tiny cells may draw no mask: nothing to learn, the curve repeats its last value.
            loss_curve.append(loss_curve[-1] if loss_curve else math.nan)
        scheduler.step()
        done = step == config.max_steps
        if step % config.eval_every == 0 or done:
            # In float32 even on a GPU: the stopping rule compares differences of 0.01 nats.
            loss = held_out_loss(model, eval_batches, device)
            evaluations.append((step, loss))
            margin = entropy - loss
            just_cleared = False
            if cleared_at is None and (config.min_loss_margin is None or margin >= config.min_loss_margin):
                cleared_at, just_cleared = step, True
            if loss < best_loss:
                best_loss, best_step = loss, step
                best_state = copy.deepcopy(model.state_dict())
            if loss <= reference_loss - config.min_improvement or just_cleared:
                reference_loss, stale = min(loss, reference_loss), 0
            else:
                stale += 1
            done = done or (cleared_at is not None and stale >= config.patience)
        report(progress, step, step if done else config.max_steps, loss=loss_curve[-1],
               held_out_loss=evaluations[-1][1] if evaluations else math.nan, margin=margin)
        if done:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainedGeneformer(model.cpu(), dictionaries, np.asarray(loss_curve, dtype=np.float64),
                             np.asarray(evaluations, dtype=np.float64).reshape(-1, 2), float(entropy),
                             None if config.min_loss_margin is None else cleared_at, best_step,
                             int(len(held_out)), time.perf_counter() - started)


def position_only_entropy(cells: TokenizedCells, dictionaries: GeneformerDictionaries, max_length: int) -> float:
    """Cross-entropy (nats per masked token) of the best predictor that knows only a token's position.

    H(token | position) over the gene tokens the model trains on (each cell's first ``max_length``
    tokens; masking picks gene tokens uniformly, so positions weigh by how many tokens they hold),
    the plug-in estimate from these cells. A masked-LM whose loss is not clearly below it has
    learnt the rank positions of frequent genes, not which genes go together. The plug-in estimate is
    biased low (it fits each position's token frequencies to the very cells it scores), so a model's
    held-out loss is held to a bar at least as strict as the position-only predictor's own held-out loss.
    """
    is_gene = np.ones(dictionaries.vocab_size, dtype=bool)
    is_gene[dictionaries.special_token_ids] = False
    lengths = np.minimum(cells.lengths, max_length)
    starts = cells.offsets[:-1]
    cell_of = np.repeat(np.arange(cells.n_cells), lengths)
    position = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    tokens = cells.token_ids[starts[cell_of] + position].astype(np.int64)
    keep = is_gene[tokens]
    if not keep.any():
        return float("nan")
    pair_key = position[keep] * dictionaries.vocab_size + tokens[keep]
    _, pair_counts = np.unique(pair_key, return_counts=True)
    pair_position = np.unique(pair_key) // dictionaries.vocab_size
    position_counts = np.bincount(position[keep])
    total = keep.sum()
    return float(-(pair_counts / total * np.log(pair_counts / position_counts[pair_position])).sum())


def training_report(trained: TrainedGeneformer, min_margin: float | None) -> dict:
    """Whether training got past the position-only predictor, in numbers, measured on held-out cells.

    Returns
    -------
    dict
        ``final_loss`` (the held-out masked-LM loss of the weights kept), ``position_only_entropy``,
        ``margin`` (their difference, nats), ``required_margin``, ``beats_position_only`` (None when no
        margin is required), ``n_steps`` (steps trained), ``cleared_at_step`` (first evaluation past the
        gate), ``best_step``, ``n_held_out_cells``, ``final_training_loss`` (mean of the last 20 steps: noisy,
        for reference only) and ``seconds``.
    """
    curve = trained.held_out_curve
    kept = curve[curve[:, 0] == trained.best_step, 1] if len(curve) else np.zeros(0)
    final_loss = float(kept[0]) if len(kept) else float("nan")
    margin = trained.position_only_entropy - final_loss
    tail = trained.loss_curve[-20:]
    return {"final_loss": final_loss, "position_only_entropy": float(trained.position_only_entropy),
            "margin": float(margin), "required_margin": min_margin, "n_steps": int(len(trained.loss_curve)),
            "cleared_at_step": trained.cleared_at_step, "best_step": trained.best_step,
            "n_held_out_cells": trained.n_held_out_cells,
            "final_training_loss": float(np.nanmean(tail)) if len(tail) else float("nan"),
            "seconds": float(trained.seconds),
            "beats_position_only": None if min_margin is None else bool(margin >= min_margin)}


def save_geneformer(trained: TrainedGeneformer, directory: str | os.PathLike) -> Path:
    """Write model (``save_pretrained``: config.json + model.safetensors), dictionaries and loss curve.

    The folder is built under a temporary name and renamed into place, replacing any
    previous one, so a half-written model never looks complete.
    """
    directory = Path(directory)
    with atomic_path(directory) as tmp_directory:
        tmp_directory.mkdir()
        trained.model.save_pretrained(tmp_directory)
        trained.dictionaries.save(tmp_directory)
        (tmp_directory / "geneformer_convention.json").write_text(
            json.dumps({"convention": trained.dictionaries.convention.name}))
        np.save(tmp_directory / "loss_curve.npy", trained.loss_curve)
        np.save(tmp_directory / "held_out_curve.npy", trained.held_out_curve)
    return directory


@dataclass
class LoadedGeneformer:
    """A model ready for attention extraction.

    Attributes
    ----------
    model
        The BERT masked-LM, eval mode, eager attention.
    dictionaries
        Its token/median dictionaries (the convention decides ``<cls>``/``<eos>``).
    """

    model: BertForMaskedLM
    dictionaries: GeneformerDictionaries


_WEIGHTS_FIX = ("use a checkpoint with model.safetensors (convert a trusted pytorch_model.bin with "
                "safetensors.torch.save_file), or a pytorch_model.bin that torch.load(weights_only=True) accepts; "
                "never load an untrusted .bin with weights_only=False")

SAFETENSORS_WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"


def _read_model_config(model_directory: Path) -> BertConfig:
    try:
        return BertConfig.from_pretrained(model_directory)
    except (OSError, ValueError, TypeError, KeyError) as error:  # json.JSONDecodeError is a ValueError
        raise ScgrnInputError(f"config.json cannot be read ({type(error).__name__}: {error})",
                              file=str(model_directory / "config.json"),
                              fix="re-download the checkpoint's config.json") from error


def _weight_files(model_directory: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors first; a sharded checkpoint's index names its shards."""
    for single in (SAFETENSORS_WEIGHTS, PICKLE_WEIGHTS):
        if (model_directory / single).is_file():
            return [model_directory / single]
        index = model_directory / f"{single}.index.json"
        if index.is_file():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ScgrnInputError(f"is not a valid shard index ({type(error).__name__}: {error})",
                                      file=str(index), fix="re-download the checkpoint") from error
            for name in shard_names:
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise ScgrnInputError(f"names a shard outside the checkpoint folder: {name!r}", file=str(index),
                                          fix="re-download the checkpoint from a source you trust (a single "
                                              "model.safetensors needs no index)")
            return [model_directory / name for name in shard_names]
    raise ScgrnInputError(f"no weights ({SAFETENSORS_WEIGHTS} or {PICKLE_WEIGHTS})", file=str(model_directory),
                          fix="point the Geneformer resource at a checkpoint folder (config.json + safetensors)")


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One weight file, through safe loaders only: safetensors, or torch.load(weights_only=True) for a .bin.

    A .bin is a pickle; weights_only refuses any global outside tensors and plain containers,
    so a hostile file runs no code. Every failure is the file's fault and says so.
    """
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights = load_file(str(path), device="cpu")
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ScgrnInputError("is missing", file=str(path), fix="re-download the checkpoint") from error
    except Exception as error:  # noqa: BLE001 - UnpicklingError, SafetensorError, KeyError, EOFError... all bad input
        kind = "safetensors" if path.name.endswith(".safetensors") else "torch.load(weights_only=True)"
        raise ScgrnInputError(f"is refused by {kind} ({type(error).__name__}: {_error_summary(error)})",
                              file=str(path), fix=_WEIGHTS_FIX) from error
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise ScgrnInputError(f"holds a {type(weights).__name__}, not a dictionary of named tensors", file=str(path),
                              fix=_WEIGHTS_FIX)
    return weights


# torch.load's message wraps the reason in advice that is wrong for an untrusted file (rerun with weights_only=False).
_GENERIC_LINES = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _error_summary(error: Exception) -> str:
    """The line of a loader's message that says what was wrong, without the loader's generic advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_GENERIC_LINES)]
    return (specific or lines or ["no message"])[0][:300]


def load_checkpoint_weights(model_directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint folder, read only through safe loaders (see :func:`_load_weight_file`)."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(model_directory)):
        state_dict.update(_load_weight_file(path))
    return state_dict


def load_geneformer(
    model_directory: str | os.PathLike,
    dictionary_directory: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
) -> LoadedGeneformer:
    """Load a Geneformer checkpoint (published or saved by :func:`save_geneformer`) with eager attention.

    Parameters
    ----------
    model_directory
        Holds ``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``).
    dictionary_directory
        Holds the token/median dictionary pickles; defaults to ``model_directory`` (where
        :func:`save_geneformer` puts them). Published checkpoints ship them separately.
    device
        Where the model is placed; default GPU when present.
    """
    model_directory = Path(model_directory)
    if not (model_directory / "config.json").is_file():
        raise ScgrnInputError("no config.json", file=str(model_directory),
                              fix="point the Geneformer resource at a checkpoint folder (config.json + safetensors)")
    dictionaries = load_geneformer_dictionaries(dictionary_directory or model_directory)
    convention_file = model_directory / "geneformer_convention.json"
    if convention_file.is_file():
        dictionaries.convention = convention_named(json.loads(convention_file.read_text())["convention"])
    config = _read_model_config(model_directory)
    state_dict = load_checkpoint_weights(model_directory)
    try:
        model, loading = BertForMaskedLM.from_pretrained(None, config=config, state_dict=state_dict,
                                                         attn_implementation="eager", output_loading_info=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:  # shapes that do not fit config.json
        raise ScgrnInputError(f"weights do not fit its config.json ({type(error).__name__}: {error})",
                              file=str(model_directory), fix=_WEIGHTS_FIX) from error
    # Encoder weights the file lacks would be random: attention from them is noise, not a network.
    missing_encoder = sorted(key for key in loading["missing_keys"] if key.startswith("bert."))
    if missing_encoder:
        raise ScgrnInputError(f"weights lack {len(missing_encoder)} encoder tensors of its config.json (e.g. "
                              f"{missing_encoder[0]}); they would be random", file=str(model_directory),
                              fix="point the Geneformer resource at the checkpoint (its model.safetensors) that this "
                                  "config.json belongs to")
    if model.config.vocab_size < dictionaries.vocab_size:
        raise ScgrnInputError(
            f"model vocabulary has {model.config.vocab_size} tokens, dictionary needs {dictionaries.vocab_size}",
            file=str(model_directory),
            fix="use the dictionaries the checkpoint was trained with (gc30M for V1, gc95M/gc104M for V2)",
        )
    return LoadedGeneformer(model.to(pick_device(device)).eval(), dictionaries)
