"""The plugin contract of the ``videotuna`` host: everything a plugin may contribute.

A plugin is a plain module (or object) with functions decorated by :data:`hookimpl` whose names
match the specifications below. It is discovered through the ``videotuna`` entry point group::

    # setup.py of a plugin distribution
    entry_points={"videotuna": ["my_plugin = my_package.plugin"]}

Every hook is called once per plugin when the registry is built (at the start of every
``videotuna`` command and of every training run) and returns a mapping ``name -> factory``.
Names are global per kind: two plugins returning the same name for the same kind is an error
that names both distributions. Return an empty dict to contribute nothing of a kind.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

PROJECT_NAME = "videotuna"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def videotuna_strategies() -> Mapping[str, Callable[..., Any]]:
    """Return training strategies, ``{name: strategy_class}``.

    Called when the registry is built. A strategy class has a classmethod
    ``run(cfg: DictConfig, registry: Registry, resume: str | None) -> pathlib.Path`` that trains
    according to ``cfg`` (the merged, override-applied config of ``videotuna train``) and returns
    the run's output directory. ``videotuna train --strategy NAME`` looks ``NAME`` up here.
    """


@hookspec
def videotuna_scorers() -> Mapping[str, Callable[..., Any]]:
    """Return video scorers, ``{name: scorer_class}``.

    Called when the registry is built. ``scorer_class(**options)`` builds a scorer with the
    attributes ``kind`` ("quality" or "semantic"), ``needs_weights`` (bool), ``weights_hint``
    (where it looks for weights, or "" when it needs none), ``version`` (str), and
    ``__call__(videos, prompts) -> Tensor[B]`` taking ``videos`` as float ``[B, F, C, H, W]`` in
    [0, 1] and ``prompts`` as ``list[str]`` of length B, returning one raw score per video.
    Optionally ``score_range = (low, high)`` (and ``score_weight``, default 1.0) makes the scorer a
    dimension of the OmniScore, min-max normalised with that range in its ``kind``'s group.
    Also optional: ``min_frames`` (int), ``unscorable(num_frames, height, width) -> str | None``
    (a reason makes ``videotuna score`` record the video as failed instead of calling the scorer),
    and ``uses_fps = True`` to receive ``__call__(videos, prompts, fps=...)``, the files' frame rate.
    See :class:`videotuna_dpo.scoring.base.Scorer` and :class:`~videotuna_dpo.scoring.base.BaseScorer`.
    """


@hookspec
def videotuna_datamodules() -> Mapping[str, Callable[..., Any]]:
    """Return data modules, ``{name: datamodule_class}``.

    Called when the registry is built. ``datamodule_class.from_config(data_cfg)`` receives the
    ``data:`` block of the training config and returns a ``lightning.LightningDataModule``.
    A config selects one with ``data.name``.
    """


@hookspec
def videotuna_models() -> Mapping[str, Callable[..., Any]]:
    """Return model backends, ``{name: backend_class}``.

    Called when the registry is built. ``backend_class.from_config(model_cfg)`` receives the
    ``model:`` block of the training config and returns a backend implementing
    :class:`videotuna_dpo.models.base.Backend` (encode, noise, predict, reference, save/load,
    generate). A config selects one with ``model.name``.
    """
