"""A scorer plugin for videotuna-dpo, published as its own distribution.

Copy this folder, rename the package and the entry point, and `pip install .`:
`videotuna plugins` then lists your scorer and `videotuna score --scorers NAME` uses it.
"""

from setuptools import setup

setup(
    name="videotuna-example-scorer",
    version="0.1.0",
    description="Example scorer plugin for videotuna-dpo (mean brightness)",
    py_modules=[],
    packages=["videotuna_example_scorer"],
    install_requires=["pluggy>=1.5", "torch"],
    # The group `videotuna` is what the host scans; the name is this plugin's name, which a
    # config may list under `plugins:`.
    entry_points={"videotuna": ["example_scorer = videotuna_example_scorer"]},
)
