"""The network group's own checks (those not declared on their asset)."""

import json
from pathlib import Path

import dagster as dg

from scgrn_assets.defs.network.assets import TRAINING_REPORT


@dg.asset_check(asset="edge_stability", blocking=True, additional_ins={"geneformer_model": dg.AssetIn()},
                description="Attention edges are published only from a model whose masked-LM loss beats the "
                            "position-only entropy by GeneformerSettings.min_loss_margin nats.")
def model_beats_position_only(geneformer_model) -> dg.AssetCheckResult:
    report_path = Path(geneformer_model) / TRAINING_REPORT
    if (Path(geneformer_model) / "pretrained.json").exists():
        return dg.AssetCheckResult(passed=True, description="a pretrained checkpoint: trained elsewhere")
    if not report_path.exists():
        return dg.AssetCheckResult(passed=False, description=f"{report_path} is missing: re-materialise "
                                                             "geneformer_model")
    report = json.loads(report_path.read_text())
    metadata = {key: report[key] for key in ("final_loss", "position_only_entropy", "margin", "n_steps")}
    if report["beats_position_only"] is None:
        return dg.AssetCheckResult(passed=True, metadata=metadata, description="no margin required (gate off)")
    if report["beats_position_only"]:
        return dg.AssetCheckResult(passed=True, metadata=metadata)
    return dg.AssetCheckResult(passed=False, metadata=metadata, description=(
        f"the model's masked-LM loss {report['final_loss']:.3f} is not {report['required_margin']} nats below the "
        f"position-only entropy {report['position_only_entropy']:.3f}: it has learnt rank positions, not genes, so "
        f"its attention edges are not published. Train longer: set the geneformer resource's train_steps above "
        f"{report['n_steps']} (e.g. {2 * report['n_steps']}) and re-materialise geneformer_model."))
