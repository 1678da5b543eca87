"""Shared test support: factories and reference computations used by more than one test module (or by bench/).

Test modules import from these modules, never from one another; pytest fixtures shared across files live in the
nearest conftest.py instead.

- ``network``: ``numpy_pcorr`` (the numpy pinv partial-correlation reference), its tolerances ``PCORR_RTOL`` /
  ``PCORR_ATOL``, ``SHRINKAGE``, ``BACKENDS``; random attention ``random_blocks`` / ``random_cells``; edge-moment
  ``ACCUMULATORS`` (parametrisation) and ``moments_frame``; ``tiny_model_and_cells`` (a small masked LM and cells).
- ``benchmarks``: ``shared_file`` (a file under ../shared/data/reference, or skip), ``write_string_v12`` (a small
  STRING v12 download); ``random_problem`` and the brute-force references ``brute_force_pairs`` and
  ``brute_force_early_precision``.
- ``validation``: ``N_BINS`` and ``sparse_like_codes`` (discretised codes shaped like single-cell data).
- ``condition_effects``: ``SimulatedCorpus`` / ``simulate_nb_corpus`` (counts drawn from the NB cell model), ``fit_inputs`` and
  ``NULL_CALL_RATE_LIMIT`` (also used by bench/nb_fit.py).
- ``archives``: tar archives built in a test (GEO ``*_RAW.tar`` layouts, hostile members).
- ``http_server``: a real HTTP server on 127.0.0.1 with scripted faults (the ``http_server`` fixture,
  registered for every test in ``scgrn_assets_tests/conftest.py``).
- ``real_geo_miniature``: miniature copies of the real catalog's GEO files, served over that server.
"""
