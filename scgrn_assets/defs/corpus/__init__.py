"""The corpus asset group."""
