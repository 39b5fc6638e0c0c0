"""Gin configuration files of xtr_jax (models/ -> runs/ -> experiments/); installed as package data."""
