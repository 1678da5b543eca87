"""A plain-data snapshot of the loaded definitions: what a reviewer should see change in a diff.

Regenerate after a deliberate change with
``PYTHONPATH=$PWD .venv/bin/python -m scgrn_assets_tests.definitions_snapshot > scgrn_assets_tests/definitions_snapshot.json``.
"""

from __future__ import annotations

import json

import dagster as dg


def snapshot(defs: dg.Definitions) -> dict:
    """Asset keys with their group, partitioning, pool, tags, kinds, IO manager and checks; the
    stand-alone checks, jobs, schedules and sensors."""
    from scgrn_assets.partitions import STUDY

    assets = {}
    for asset in defs.assets:
        spec = next(iter(asset.specs))
        assets[asset.key.to_user_string()] = {
            "group": spec.group_name,
            "partitioned_by_study": asset.partitions_def is not None and asset.partitions_def != STUDY,
            "pool": asset.op.pool,
            "op_tags": sorted(asset.op.tags),
            "tags": {k: v for k, v in sorted(spec.tags.items()) if not k.startswith("dagster/kind/")},
            "kinds": sorted(spec.kinds),
            "io_manager": asset.get_io_manager_key_for_asset_key(asset.key),
            "checks": sorted(f"{c.name}{' (blocking)' if c.blocking else ''}" for c in asset.check_specs),
        }
    checks = sorted(f"{key.asset_key.to_user_string()}:{key.name}" for c in defs.asset_checks for key in c.check_keys)
    repository = defs.get_repository_def()
    return {"assets": dict(sorted(assets.items())), "asset_checks": checks,
            "jobs": sorted(name for name in repository.job_names if not name.startswith("__")),
            "schedules": sorted(s.name for s in repository.schedule_defs),
            "sensors": sorted(s.name for s in repository.sensor_defs)}


if __name__ == "__main__":
    from scgrn_assets.definitions import build_definitions

    print(json.dumps(snapshot(build_definitions("demo")), indent=1))
