"""Geneformer models: load a published checkpoint, or train a small one on the corpus.

Both paths give a ``transformers`` BERT with eager attention (the default sdpa kernel
returns no attention weights) plus the dictionaries it was trained with. A model trained
here is written with ``save_pretrained`` next to its dictionaries, so it reloads exactly
like a published checkpoint through :func:`load_geneformer`.
"""

from __future__ import annotations

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
    """Architecture and training settings of the demo model (Geneformer's BERT, scaled down).

    Geneformer V1 is 6 layers, 256 hidden, 4 heads, intermediate 512, ReLU, dropout 0.02.
    """

    n_layers: int = 4
    hidden_size: int = 128
    n_heads: int = 4
    intermediate_size: int = 256
    dropout: float = 0.02
    mask_probability: float = 0.15
    n_steps: int = 300
    batch_size: int = 8
    max_train_length: int = 256
    """Tokens per cell seen in training: the top-ranked ones, as many as the attention step reads
    (256 genes); keeps the CPU demo to ~1-2 minutes on 2 idle cores."""
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.001
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
        The trained masked-LM (eval mode, on CPU).
    dictionaries
        Token/median dictionaries the cells were encoded with.
    loss_curve
        Shape (n_steps,), float64: masked-LM cross-entropy (nats per masked token) per step.
    """

    model: BertForMaskedLM
    dictionaries: GeneformerDictionaries
    loss_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_small_geneformer(
    cells: TokenizedCells,
    dictionaries: GeneformerDictionaries,
    config: SmallGeneformerConfig = SmallGeneformerConfig(),
    *,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> TrainedGeneformer:
    """Train a small Geneformer-architecture BERT masked-LM on tokenized cells.

    Batches are cells drawn uniformly with replacement (seeded), each truncated to its
    ``config.max_train_length`` top-ranked tokens. AdamW with linear warm-up then linear decay.

    Parameters
    ----------
    cells
        Tokenized corpus (:func:`scgrn_assets.lib.network.tokens.tokenize_cells`).
    dictionaries
        The dictionaries ``cells`` were encoded with (vocabulary and special tokens).
    progress
        Called as ``progress(step, n_steps, loss=loss)`` after every step.
    """
    if cells.n_cells == 0:
        raise ScgrnInputError("no tokenized cells to train on", fix="check the corpus and its gene dictionary")
    device = pick_device(device)
    model = build_masked_lm(dictionaries.vocab_size, dictionaries.convention.model_input_size, config,
                            dictionaries.token_dictionary[PAD_TOKEN]).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    n_warmup = max(1, int(config.warmup_fraction * config.n_steps))

    def learning_rate_factor(step: int) -> float:
        if step < n_warmup:
            return (step + 1) / n_warmup
        return max(0.0, (config.n_steps - step) / max(1, config.n_steps - n_warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    special_ids = torch.as_tensor(dictionaries.special_token_ids, device=device)
    mask_id = dictionaries.token_dictionary[MASK_TOKEN]
    max_length = min(config.max_train_length, dictionaries.convention.model_input_size)
    loss_curve = np.zeros(config.n_steps)
    for step in range(config.n_steps):
        batch = rng.integers(0, cells.n_cells, size=config.batch_size)
        input_ids, attention_mask = (torch.as_tensor(array, device=device)
                                     for array in cells.padded(batch, max_length=max_length))
        masked_ids, labels = mask_tokens(input_ids, attention_mask, special_ids, mask_id,
                                         dictionaries.vocab_size, config.mask_probability, generator)
        if (labels != IGNORE_LABEL).any():
            output = model(input_ids=masked_ids, attention_mask=attention_mask, labels=labels)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_curve[step] = float(output.loss.detach())
        else:
            # A batch of tiny cells may draw no mask: nothing to learn, the curve repeats its last value.
            loss_curve[step] = loss_curve[step - 1] if step else math.nan
        scheduler.step()
        report(progress, step + 1, config.n_steps, loss=float(loss_curve[step]))
    model.eval()
    return TrainedGeneformer(model.cpu(), dictionaries, loss_curve)


def position_only_entropy(cells: TokenizedCells, dictionaries: GeneformerDictionaries, max_length: int) -> float:
    """Cross-entropy (nats per masked token) of the best predictor that knows only a token's position.

    H(token | position) over the gene tokens the model trains on (each cell's first ``max_length``
    tokens; masking picks gene tokens uniformly, so positions weigh by how many tokens they hold),
    the plug-in estimate from these cells. A masked-LM whose loss is not clearly below it has
    learnt the rank positions of frequent genes, not which genes go together.
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


def training_report(loss_curve: np.ndarray, position_entropy: float, min_margin: float | None,
                    window: int = 20) -> dict:
    """Whether training got past the position-only predictor, in numbers.

    Returns
    -------
    dict
        ``final_loss`` (mean of the last ``window`` steps), ``position_only_entropy``, ``margin`` (their
        difference, nats), ``required_margin`` and ``beats_position_only`` (None when no margin is required).
    """
    final_loss = float(np.nanmean(loss_curve[-window:])) if len(loss_curve) else float("nan")
    margin = position_entropy - final_loss
    return {"final_loss": final_loss, "position_only_entropy": float(position_entropy), "margin": float(margin),
            "required_margin": min_margin, "n_steps": int(len(loss_curve)),
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
