"""The validation asset group."""
