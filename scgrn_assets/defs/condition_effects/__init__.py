"""The condition_effects asset group."""
