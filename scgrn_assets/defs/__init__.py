"""The assets and checks, one folder per asset group (``ingest``, ``corpus``, ``nb_model``, ``network``,
``validation``, ``benchmarks``), loaded by :func:`scgrn_assets.definitions.build_definitions`.

Each folder's ``assets.py`` holds its assets (checks declared on them as ``check_specs``), and
``checks.py`` the group's stand-alone checks. Resources and IO managers are in
``scgrn_assets/resources.py`` and ``io_managers.py``, jobs, schedules and sensors in ``jobs.py``.
"""
