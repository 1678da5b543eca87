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
    metadata = {key: report[key] for key in ("final_loss", "position_only_entropy", "margin", "n_steps")
                if key in report}
    if report["beats_position_only"] is None:
        return dg.AssetCheckResult(passed=True, metadata=metadata, description="no margin required (gate off)")
    if report["beats_position_only"]:
        return dg.AssetCheckResult(passed=True, metadata=metadata, description=(
            f"held-out masked-LM loss {report['final_loss']:.3f} is {report['margin']:.3f} nats below the "
            f"position-only entropy (cleared at step {report.get('cleared_at_step')})"))
    return dg.AssetCheckResult(passed=False, metadata=metadata, description=(
        f"the model's masked-LM loss on held-out cells, {report['final_loss']:.3f}, is not "
        f"{report['required_margin']} nats below the position-only entropy {report['position_only_entropy']:.3f}: "
        f"it has learnt rank positions, not genes, so its attention edges are not published. It trained "
        f"{report['n_steps']} steps (the ceiling) without clearing the gate: raise the geneformer resource's "
        f"train_steps (e.g. to {2 * report['n_steps']}) and re-materialise geneformer_model."))
