"""Preference datasets, video IO, the latent cache and the Lightning data module."""
