"""Readers of reference network files (TRRUST, DoRothEA / CollecTRI regulon tables, plain edge lists,
STRING v12), each into the normalised form of :func:`normalise_reference`.

The form: a :class:`pandas.DataFrame` with the columns of :data:`REFERENCE_COLUMNS`:

``source``, ``target``
    Gene symbols exactly as the file spells them (case preserved).
``sign``
    ``+1`` activation, ``-1`` repression, ``0`` unknown or both (int8).
``directed``
    ``True`` when the file states a regulator -> target direction (TF-target sets, ground truths);
    ``False`` for symmetric associations (STRING), which are then listed once per unordered pair.
``reference``
    The reference's name, so tables from several references can be concatenated.

Rows are deduplicated on (source, target) (on the unordered pair for undirected references).
Self-loops are kept, because they are part of what the file says; the metrics drop them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.text_files import open_text

REFERENCE_COLUMNS = ["source", "target", "sign", "directed", "reference"]

#: STRING's documented threshold for "high confidence" links (scores are 0-1000).
STRING_HIGH_CONFIDENCE = 700

_TRRUST_MODE_SIGN = {"Activation": 1, "Repression": -1, "Unknown": 0}
_PLUS_MINUS_SIGN = {"+": 1, "-": -1, "activation": 1, "repression": -1, "1": 1, "-1": -1, "+1": 1}


def normalise_reference(
    edges: pd.DataFrame, *, name: str, directed: bool, study: str | None = None, file: str | None = None
) -> pd.DataFrame:
    """Bring an edge table with ``source``, ``target`` and optional ``sign`` columns into the normalised form.

    Duplicate (source, target) rows are merged: their sign is kept when all agree on a non-zero
    sign, becomes the non-zero sign when the others are unknown, and becomes 0 when they disagree
    (TRRUST lists a pair once per mode, e.g. both Activation and Repression).

    Parameters
    ----------
    edges
        DataFrame with string columns ``source`` and ``target``; ``sign`` (-1/0/+1) if known.
    name
        Reference name written into the ``reference`` column.
    directed
        Whether source -> target is a stated direction. Undirected references are stored once per
        unordered pair, the lexicographically smaller symbol as ``source``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`REFERENCE_COLUMNS`, one row per (un)ordered pair, index 0..n-1.
    """
    if not {"source", "target"} <= set(edges.columns):
        raise ScgrnInputError(
            f"edge table has columns {list(edges.columns)}, expected source and target",
            study=study, file=file, fix="rename the regulator / target columns or pass the right loader",
        )
    missing = edges["source"].isna().to_numpy() | edges["target"].isna().to_numpy()
    sources = np.array([str(symbol).strip() for symbol in edges["source"]], dtype=object)
    targets = np.array([str(symbol).strip() for symbol in edges["target"]], dtype=object)
    empty = missing | (sources == "") | (targets == "")
    if empty.any():
        raise ScgrnInputError(
            f"row {int(np.flatnonzero(empty)[0]) + 1} has an empty gene symbol",
            study=study, file=file, fix="remove incomplete rows or re-download the file",
        )
    if not directed:
        swap = sources > targets
        sources[swap], targets[swap] = targets[swap], sources[swap]
    signs = edges["sign"].to_numpy(dtype=np.int8) if "sign" in edges.columns else np.zeros(len(edges), np.int8)
    table = pd.DataFrame({"source": sources, "target": targets, "sign": signs})
    sign_range = table.groupby(["source", "target"], sort=False)["sign"].agg(["min", "max"])
    has_positive = sign_range["max"].to_numpy() > 0
    has_negative = sign_range["min"].to_numpy() < 0
    merged_sign = np.where(has_positive & ~has_negative, 1, np.where(has_negative & ~has_positive, -1, 0))
    result = sign_range.index.to_frame(index=False)
    result["sign"] = merged_sign.astype(np.int8)
    result["directed"] = bool(directed)
    result["reference"] = name
    return result[REFERENCE_COLUMNS].reset_index(drop=True)


def _require_file(path: str | Path, *, study: str | None) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ScgrnInputError(
            "reference file not found", study=study, file=str(path),
            fix="check the path in the reference configuration or configure its official URL",
        )
    return path


def load_trrust(path: str | Path, *, name: str = "TRRUST", study: str | None = None) -> pd.DataFrame:
    """Read a TRRUST raw download (tab-separated ``TF, target, mode, PMIDs``; no header).

    ``mode`` Activation / Repression / Unknown becomes sign +1 / -1 / 0; a pair listed with
    both Activation and Repression gets sign 0. A header line (as some mirrors add) is skipped.

    Returns
    -------
    pandas.DataFrame
        Normalised directed reference, one row per unique TF -> target pair.
    """
    path = _require_file(path, study=study)
    with open_text(path) as handle:
        table = pd.read_csv(handle, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3)
    if table.shape[1] != 4:
        raise ScgrnInputError(
            f"has {table.shape[1]} tab-separated columns, expected 4 (TF, target, mode, PMIDs)",
            study=study, file=str(path), fix="pass the raw TRRUST download, not a converted table",
        )
    table.columns = ["source", "target", "mode", "pmids"]
    if table.loc[0, "mode"] not in _TRRUST_MODE_SIGN:
        table = table.iloc[1:]  # a mirror's added header line
    unknown_modes = sorted(set(table["mode"]) - set(_TRRUST_MODE_SIGN))
    if unknown_modes:
        raise ScgrnInputError(
            f"unknown regulation modes {unknown_modes[:5]}, expected Activation / Repression / Unknown",
            study=study, file=str(path), fix="check that the file is a TRRUST raw download",
        )
    table["sign"] = table["mode"].map(_TRRUST_MODE_SIGN)
    return normalise_reference(table, name=name, directed=True, study=study, file=str(path))


def load_regulon_table(
    path: str | Path,
    *,
    name: str,
    confidence_levels: Iterable[str] | None = None,
    study: str | None = None,
) -> pd.DataFrame:
    """Read a DoRothEA / CollecTRI-style TF-target table (CSV or TSV with a header).

    Recognised columns: regulator ``tf`` or ``source``; ``target``; mode of regulation ``mor``,
    ``weight`` or ``sign`` (its sign is kept); optional ``confidence`` (DoRothEA's A..E).

    Parameters
    ----------
    confidence_levels
        Keep only rows whose ``confidence`` is one of these (e.g. ``"ABC"``); ``None`` keeps all.

    Returns
    -------
    pandas.DataFrame
        Normalised directed reference.
    """
    path = _require_file(path, study=study)
    with open_text(path) as handle:
        table = pd.read_csv(handle, sep=None, engine="python", dtype=str, keep_default_na=False)
    columns = {column.lower(): column for column in table.columns}
    regulator_column = columns.get("tf", columns.get("source"))
    sign_column = next((columns[c] for c in ("mor", "weight", "sign") if c in columns), None)
    if regulator_column is None or "target" not in columns:
        raise ScgrnInputError(
            f"has columns {list(table.columns)}, expected tf (or source), target and mor (or weight)",
            study=study, file=str(path), fix="rename the columns or use load_edge_list for other layouts",
        )
    if confidence_levels is not None:
        if "confidence" not in columns:
            raise ScgrnInputError(
                "a confidence filter was configured but the table has no confidence column",
                study=study, file=str(path), fix="drop confidence_levels from the reference configuration",
            )
        table = table[table[columns["confidence"]].isin(set(confidence_levels))]
    edges = pd.DataFrame({"source": table[regulator_column], "target": table[columns["target"]]})
    if sign_column is not None:
        mode_of_regulation = pd.to_numeric(table[sign_column], errors="coerce")
        if mode_of_regulation.isna().any():
            raise ScgrnInputError(
                f"column {sign_column} has non-numeric values",
                study=study, file=str(path), fix="mode of regulation must be a number such as +1 / -1",
            )
        edges["sign"] = np.sign(mode_of_regulation.to_numpy()).astype(np.int8)
    return normalise_reference(edges, name=name, directed=True, study=study, file=str(path))


def load_edge_list(
    path: str | Path,
    *,
    name: str,
    directed: bool = True,
    source_column: int | str = 0,
    target_column: int | str = 1,
    sign_column: int | str | None = None,
    header: bool | None = None,
    study: str | None = None,
) -> pd.DataFrame:
    """Read a symbol-level edge list: a plain two-column list, BEELINE's ``STRING-network.csv``,
    BEELINE ``GroundTruthNetwork.csv`` (``Gene1,Gene2,Type``), SERGIO ``gt_GRN.csv`` and the like.

    The separator (comma, tab, whitespace) is sniffed. Signs are read from ``sign_column`` when given:
    ``+`` / ``-``, ``activation`` / ``repression`` or a number, whose sign is used.

    Parameters
    ----------
    directed
        Whether column 1 -> column 2 is a stated direction. BEELINE's STRING networks are TF-first
        functional links, not causal: load them with ``directed=False``.
    source_column, target_column, sign_column
        Column positions or header names.
    header
        Whether the first line is a header; ``None`` guesses (a header when ``sign_column`` is a name,
        or the first line's first two fields both appear nowhere else in their columns).

    Returns
    -------
    pandas.DataFrame
        Normalised reference.
    """
    path = _require_file(path, study=study)
    with open_text(path) as handle:
        text = handle.read()
    first_line = text.split("\n", 1)[0]
    separator = "," if "," in first_line else ("\t" if "\t" in first_line else r"\s+")
    raw = pd.read_csv(io.StringIO(text), sep=separator, header=None, dtype=str, keep_default_na=False)
    named_columns = [c for c in (source_column, target_column, sign_column) if isinstance(c, str)]
    if header is None:
        header = bool(named_columns) or _first_row_looks_like_header(raw)
    if header:
        raw.columns = [str(value) for value in raw.iloc[0]]
        raw = raw.iloc[1:].reset_index(drop=True)

    def column(key: int | str) -> pd.Series:
        try:
            return raw[key] if isinstance(key, str) else raw.iloc[:, key]
        except (KeyError, IndexError):
            raise ScgrnInputError(
                f"has no column {key!r} (columns: {list(raw.columns)})",
                study=study, file=str(path), fix="fix source_column / target_column / sign_column in the configuration",
            ) from None

    edges = pd.DataFrame({"source": column(source_column), "target": column(target_column)})
    if sign_column is not None:
        edges["sign"] = _parse_signs(column(sign_column), study=study, file=str(path))
    return normalise_reference(edges, name=name, directed=directed, study=study, file=str(path))


def _first_row_looks_like_header(raw: pd.DataFrame) -> bool:
    """A header's first two fields (e.g. ``Gene1``, ``Gene2``) are not genes of the network."""
    if len(raw) < 2 or raw.shape[1] < 2:
        return False
    body_genes = set(raw.iloc[1:, 0]) | set(raw.iloc[1:, 1])
    return raw.iloc[0, 0] not in body_genes and raw.iloc[0, 1] not in body_genes


def _parse_signs(values: pd.Series, *, study: str | None, file: str) -> np.ndarray:
    text = values.astype(str).str.strip().str.lower()
    signs = text.map(_PLUS_MINUS_SIGN)
    numeric = pd.to_numeric(text, errors="coerce")
    signs = signs.fillna(np.sign(numeric))
    if signs.isna().any():
        bad_value = values[signs.isna()].iloc[0]
        raise ScgrnInputError(
            f"sign value {bad_value!r} is not +/-, activation/repression or a number",
            study=study, file=file, fix="fix the sign column or leave sign_column unset",
        )
    return signs.to_numpy().astype(np.int8)


def load_string_v12(
    info_path: str | Path,
    links_path: str | Path,
    aliases_path: str | Path | None = None,
    *,
    gene_symbols: Sequence[str] | None = None,
    min_combined_score: int = STRING_HIGH_CONFIDENCE,
    name: str = "STRING",
    study: str | None = None,
) -> pd.DataFrame:
    """Read STRING v12 ``protein.info``, ``protein.aliases`` and ``protein.links`` files (plain or ``.gz``).

    Links with ``combined_score >= min_combined_score`` are kept (``protein.links.detailed`` /
    ``.full`` files work too: ``combined_score`` is read by name). Proteins become gene symbols:

    - without ``gene_symbols``: each protein's ``preferred_name``;
    - with ``gene_symbols`` (the data's genes): each symbol is matched to a protein through the
      preferred names first, then through the aliases when an aliases file is given (an alias naming
      several proteins is skipped), so edges come out in the data's own spelling. Unmatched symbols
      simply have no edges.

    Returns
    -------
    pandas.DataFrame
        Normalised undirected reference (STRING links are symmetric), sign 0.
    """
    info_path = _require_file(info_path, study=study)
    links_path = _require_file(links_path, study=study)
    info = _read_string_table(info_path, ["string_protein_id", "preferred_name"], study=study)
    links = _read_string_table(links_path, ["protein1", "protein2", "combined_score"], study=study)
    links = links[pd.to_numeric(links["combined_score"]) >= min_combined_score]

    if gene_symbols is None:
        protein_to_symbol = dict(zip(info["string_protein_id"], info["preferred_name"]))
    else:
        alias_columns = ["string_protein_id", "alias"]
        if aliases_path is None:
            aliases = pd.DataFrame(columns=alias_columns)
        else:
            aliases = _read_string_table(_require_file(aliases_path, study=study), alias_columns, study=study)
        protein_to_symbol = _match_symbols_to_proteins(gene_symbols, info, aliases)
    edges = pd.DataFrame({
        "source": links["protein1"].map(protein_to_symbol),
        "target": links["protein2"].map(protein_to_symbol),
    }).dropna()
    return normalise_reference(edges, name=name, directed=False, study=study, file=str(links_path))


def _read_string_table(path: Path, required: list[str], *, study: str | None) -> pd.DataFrame:
    """STRING tables: a header line (``#string_protein_id ...``), tab- or space-separated."""
    with open_text(path) as handle:
        header_line = handle.readline()
        separator = "\t" if "\t" in header_line else " "  # info / aliases use tabs, links use spaces
        table = pd.read_csv(handle, sep=separator, header=None, dtype=str, keep_default_na=False, quoting=3)
    table.columns = [column.strip().lstrip("#") for column in header_line.strip("\n").split(separator)]
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ScgrnInputError(
            f"has columns {list(table.columns)}, missing {missing}",
            study=study, file=str(path), fix="pass the STRING v12 protein.info / protein.aliases / protein.links files",
        )
    return table[required]


def _match_symbols_to_proteins(
    gene_symbols: Sequence[str], info: pd.DataFrame, aliases: pd.DataFrame
) -> dict[str, str]:
    """Map STRING protein ids to the data's symbols: preferred names first, then unambiguous aliases."""
    wanted = set(gene_symbols)
    preferred = info[info["preferred_name"].isin(wanted)]
    symbol_to_protein = dict(zip(preferred["preferred_name"], preferred["string_protein_id"]))
    unmatched = wanted - symbol_to_protein.keys()
    candidate_aliases = aliases[aliases["alias"].isin(unmatched)].drop_duplicates(["string_protein_id", "alias"])
    proteins_per_alias = candidate_aliases.groupby("alias")["string_protein_id"].nunique()
    unambiguous = candidate_aliases[candidate_aliases["alias"].map(proteins_per_alias) == 1]
    taken_proteins = set(symbol_to_protein.values())
    for alias, protein in zip(unambiguous["alias"], unambiguous["string_protein_id"]):
        if protein not in taken_proteins:  # one protein stands for one data gene
            symbol_to_protein[alias] = protein
            taken_proteins.add(protein)
    return {protein: symbol for symbol, protein in symbol_to_protein.items()}
