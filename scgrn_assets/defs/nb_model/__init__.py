"""The nb_model asset group."""
