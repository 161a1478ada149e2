"""The plugin contract of the ``videotuna`` host: everything a plugin may contribute.

A plugin is a plain module (or object) with functions decorated by :data:`hookimpl` whose names
match the specifications below. It is discovered through the ``videotuna`` entry point group::

    # setup.py of a plugin distribution
    entry_points={"videotuna": ["my_plugin = my_package.plugin"]}

Every hook takes no arguments, is called once per plugin when the registry is built (at the start
of every ``videotuna`` command, of every training run and of ``videotuna plugins``) and returns a
mapping ``name -> factory``; return an empty dict to contribute nothing of a kind. Names are global
per kind: two plugins returning the same name for the same kind is an error that names both
distributions. A config's top-level ``plugins:`` list (entry point names) loads only those plugins.

A factory is the object itself (a class) or a ``"package.module:attribute"`` string naming it. A
string is imported only when the factory is first used, so ``videotuna plugins`` and ``--help``
never import it: return strings when the module imports torch or anything slow.

Arguments this file marks *optional* are passed by the host only to a callable whose signature
names them (or takes ``**kwargs``); a plugin may leave them out. Every other argument is always
passed, by the name written here.

Configs are ``omegaconf.DictConfig`` objects: the YAML of ``--config`` with the command line's
``key=value`` overrides applied.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

PROJECT_NAME = "videotuna"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def videotuna_strategies() -> Mapping[str, Callable[..., Any] | str]:
    """Return training strategies, ``{name: strategy_class}``.

    ``videotuna train --strategy NAME --config FILE [key=value ...]`` looks ``NAME`` up here and
    calls ``strategy_class.run(cfg, registry, resume=resume)``:

    - ``cfg``: the whole training config (``DictConfig``), overrides applied. Its ``plugins:`` list,
      if any, is the set of plugins ``registry`` was loaded with; every other key is the strategy's.
    - ``registry``: the :class:`videotuna_dpo.registry.Registry` of the loaded plugins;
      ``registry.get(kind, name)`` gives the factory of a ``"strategy"``, ``"scorer"``,
      ``"datamodule"`` or ``"model"`` (unknown names raise an error listing the installed ones),
      ``registry.names(kind)`` the installed names.
    - ``resume``: ``--resume``: ``None``, ``"last"`` or a checkpoint path, the strategy's to interpret.
    - ``source`` (optional, str): the config file's path, for error messages.

    ``run`` trains and returns the run's output directory (``pathlib.Path``), which the command
    prints. A :class:`videotuna_dpo.errors.UserError` it raises is printed without a traceback
    (exit status 2). The built-in ``dpo`` is :class:`videotuna_dpo.strategy.DPOStrategy`.
    """


@hookspec
def videotuna_scorers() -> Mapping[str, Callable[..., Any] | str]:
    """Return video scorers, ``{name: scorer_class}``.

    ``videotuna score --scorers NAME,...``, ``videotuna eval`` and the training run's eval callback
    build each named scorer once with ``scorer_class(**options)``: ``options`` are the
    ``--option NAME.KEY=VALUE`` pairs of that scorer (values parsed as YAML), plus ``device``
    (optional, a torch device string such as ``"cpu"`` or ``"cuda"``). A ``TypeError`` from the
    constructor is reported as bad options.

    The scorer has the attributes

    - ``kind``: ``"quality"`` or ``"semantic"``, its group in the OmniScore;
    - ``needs_weights`` (bool) and ``weights_hint`` (str: where it looks for weights, ``""`` when it
      needs none); raise :class:`videotuna_dpo.scoring.base.MissingWeightsError` from the
      constructor when they are missing, and every scorer's missing weights are reported together;
    - ``version`` (str): recorded with every score; a resumed scores file made with another version
      is refused;

    and is called as ``scorer(videos, prompts)``: ``videos`` a float ``torch.Tensor``
    ``[B, F, C, H, W]`` (C = 3) in [0, 1] on the device, ``prompts`` a ``list[str]`` of length B. It
    returns a ``torch.Tensor`` of B finite raw scores (any shape with B elements; a non-finite
    value records that video as failed).

    Optional attributes:

    - ``score_range = (low, high)``: the scorer is a dimension of the OmniScore, min-max normalised
      with that range in its ``kind``'s group, weighted ``score_weight`` (float, default 1.0).
      Without it the raw score is recorded and the OmniScore is made of the other dimensions, or
      left out of the records when no scorer is a dimension (``videotuna pairs --by NAME`` ranks by
      any recorded score).
    - ``min_frames`` (int): shorter videos are recorded as failed, not scored.
    - ``unscorable(num_frames, height, width) -> str | None``: a reason records the video as failed
      instead of calling the scorer.
    - ``uses_fps = True``: called as ``scorer(videos, prompts, fps=fps)`` with the files' frame rate
      (float, or None when unknown).
    - ``describe() -> dict``: recorded with every score (default ``{"version", "weights"}``).

    :class:`videotuna_dpo.scoring.base.BaseScorer` implements the checks; subclassing it is optional.
    """


@hookspec
def videotuna_datamodules() -> Mapping[str, Callable[..., Any] | str]:
    """Return data modules, ``{name: datamodule_class}``.

    A training config selects one with ``data.name`` (default ``"preference"``). The ``dpo``
    strategy calls ``datamodule_class.from_config(data_cfg)`` with ``data_cfg`` the ``data:`` block
    (``DictConfig``, ``name`` included) and ``source`` (optional, the config file's path), and gets
    a ``lightning.LightningDataModule`` whose ``train_dataloader()`` yields batches (dicts) of
    preference pairs, the winner and loser of pair i at index i:

    - ``"winner"``, ``"loser"``: float tensors ``[B, C, F, H, W]`` in [-1, 1] (encoded by the
      backend's ``encode_video``), and ``"caption"``: ``list[str]`` of length B; or, from
      precomputed latents, ``"winner_latents"``, ``"loser_latents"`` (the backend's latent layout)
      and ``"prompt_embeds"`` (its ``encode_prompt`` output), optionally ``"null_embeds"`` (the
      empty caption's, for ``dpo.uncond_prob``);
    - ``"weight"`` (optional): float tensor ``[B]``, each pair's loss weight (default 1).

    Optional attributes the ``dpo`` strategy uses when present:

    - ``holds_latents`` (bool): batches carry latents; the backend is then built with
      ``load_text_and_vae: false`` and ``check_model(model_cfg)`` is called first, to refuse
      latents of another model;
    - ``seed`` (settable int): set to the run's ``seed`` before training, for the data order;
    - ``shard_by_rank`` (settable bool): set to True under several processes when the module
      shards its pairs by ``trainer.global_rank`` itself (Lightning's sampler is then not used).
    """


@hookspec
def videotuna_models() -> Mapping[str, Callable[..., Any] | str]:
    """Return model backends, ``{name: backend_class}``.

    A config selects one with ``model.name``. ``videotuna train``, ``generate``, ``cache`` and
    ``eval`` call ``backend_class.from_config(model_cfg)`` with ``model_cfg`` the ``model:`` block
    (``DictConfig``, ``name`` included) and ``source`` (optional, the config file's path). The
    block may also hold ``trainable_weights`` (``generate --weights``: a directory
    ``save_trainable`` wrote, to load) and, for a backend with ``latent_distribution``,
    ``load_text_and_vae`` (false: training from latents, the VAE and text encoder are not needed).

    The backend is a ``torch.nn.Module`` (the host calls ``.to(device)``, ``.eval()``,
    ``.parameters()``, ``.modules()`` and checkpoints its trainable tensors by name) implementing
    :class:`videotuna_dpo.models.base.Backend`, which says every method's shapes: ``encode_video``,
    ``encode_prompt``, ``sample_timesteps``, ``add_noise``, ``target``, ``predict``, ``reference``,
    ``trainable_parameters``, ``save_trainable``, ``load_trainable`` and ``generate``, called as
    ``generate(prompts, seed=[one int per prompt], num_frames=, steps=, guidance=)`` plus
    ``height``, ``width``, ``negative_prompt`` and ``guidance_2`` only when the config's
    ``generate:`` block sets them.

    Optional: ``latent_distribution(pixels) -> (mean, std)`` (``videotuna cache``; without it the
    backend trains from videos only); ``eps_equivalent_weight(t)`` with
    ``set_timestep_sampling(name, logit_mean, logit_std, mode_scale)`` (a flow-matching backend:
    ``dpo.beta_schedule`` and ``dpo.timestep_sampling``); ``trained_attrs`` (several routed denoisers).

    The VideoTuna entrance (:mod:`videotuna_dpo.videotuna_flow`) takes only the built-in backends
    built on a VideoTuna flow; those also define ``schema`` (their ``model:`` dataclass),
    ``checkpoint_keys`` and ``train_ckpt_hint`` (messages), ``check_flow_section``,
    ``restore_trainable`` and ``__init__(cfg, flow=...)``
    (:class:`videotuna_dpo.models.videotuna_host.VideoTunaFlowBackend` gives ``from_config`` and
    ``restore_trainable``).
    """
