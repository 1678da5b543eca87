"""The network asset group."""
