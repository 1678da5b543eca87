"""The assets and checks, one folder per asset group (``ingest``, ``corpus``, ``condition_effects``, ``network``,
``validation``, ``benchmarks``), loaded by :func:`scgrn_assets.definitions.build_definitions`.

Each folder's ``assets.py`` holds its assets and ``checks.py`` its checks: the check specs an asset
evaluates as it writes (``check_specs=...``), or stand-alone ``@asset_check`` functions. Resources and IO managers are in
``scgrn_assets/resources.py`` and ``io_managers.py``, jobs, schedules and sensors in ``jobs.py``.
"""
