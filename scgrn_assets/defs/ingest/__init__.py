"""The ingest asset group."""
