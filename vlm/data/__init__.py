"""Datasets, formats, chat templates, processing and collation."""
