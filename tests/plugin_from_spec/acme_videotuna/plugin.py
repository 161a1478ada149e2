import pluggy

hookimpl = pluggy.HookimplMarker("videotuna")


@hookimpl
def videotuna_strategies():
    return {"acme_count": "acme_videotuna.strategy:CountStrategy"}


@hookimpl
def videotuna_scorers():
    return {"acme_redness": "acme_videotuna.scorer:Redness"}


@hookimpl
def videotuna_datamodules():
    return {"acme_toggle": "acme_videotuna.data:ToggleData"}


@hookimpl
def videotuna_models():
    return {"acme_pixels": "acme_videotuna.backend:PixelBackend"}
