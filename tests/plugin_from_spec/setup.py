"""A third-party plugin written from videotuna_dpo/hookspecs.py alone: one strategy, datamodule, backend, scorer."""

from setuptools import setup

setup(
    name="acme-videotuna",
    version="2.0.0",
    packages=["acme_videotuna"],
    entry_points={"videotuna": ["acme = acme_videotuna.plugin"]},
)
