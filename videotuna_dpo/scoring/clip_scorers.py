"""CLIP-based dimensions: ``aesthetic_quality`` and ``overall_consistency``.

``aesthetic_quality`` runs the LAION head on open_clip's CLIP ViT-L/14. ``overall_consistency`` is
VBench's text-video similarity with ViCLIP (``scoring/viclip.py``) when its checkpoint is given, or
with CLIP frame features averaged over 8 frames otherwise; the CLIP model is loaded once and shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from videotuna_dpo.checkpoint_io import load_torchscript_tensors
from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.scoring.base import (
    WEIGHTS_ENV,
    BaseScorer,
    find_weights,
    load_state_dict,
    pick_backend,
    reject_unused,
    to_uint8_levels,
)
from videotuna_dpo.scoring.viclip import shared_viclip, viclip_tokenizer

CLIP_FILE = "clip/ViT-L-14.pt"
AESTHETIC_FILE = "aesthetic/sa_0_4_vit_l_14_linear.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_WHAT = "the CLIP ViT-L/14 checkpoint (OpenAI's ViT-L-14.pt, or an open_clip state dict of the same model)"

_LOADED: dict[tuple[str, str, str], torch.nn.Module] = {}


PRECISIONS = ("fp32", "fp16")


def load_clip(model_name: str, path: Path, device: torch.device, scorer: str = "clip",
              precision: str = "fp32") -> torch.nn.Module:
    """An open_clip model built from ``model_name`` with the weights at ``path``; loaded once per process.

    ``precision="fp16"`` is OpenAI CLIP's half precision, as ``clip.load`` runs it on a GPU (and so VBench):
    convolution, linear and attention weights and the projections in fp16, layer norms computed in fp32.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise UserError(f"{scorer}: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    key = (model_name, str(path), str(device), precision)
    if key not in _LOADED:
        model = open_clip.create_model(model_name, pretrained=None, precision=precision)
        try:
            if is_torchscript_archive(path):  # OpenAI's ViT-L-14.pt: its tensors are read, its code never runs
                state = load_torchscript_tensors(path)
                state = {k: v for k, v in state.items()
                         if k not in ("input_resolution", "context_length", "vocab_size")}
                if "logit_scale" in state:
                    state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
                model.load_state_dict(state, strict=True)
            else:  # a state dict: tensors only, nothing unpickled
                open_clip.load_checkpoint(model, str(path), weights_only=True)
        except UserError as exc:  # already names the file and what is wrong with it
            raise UserError(f"{scorer}: {exc}") from None
        except Exception as exc:  # unreadable file, pickled objects, other architecture
            raise UserError(f"{scorer}: cannot load {path} as open_clip's {model_name} "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
        _LOADED[key] = model.eval().to(device)
    return _LOADED[key]


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript zip (it carries ``code/``): its tensors are read without its code."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def clip_preprocess(frames: torch.Tensor, size: int, uint8_resize: bool = False) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, size, size]`` as VBench's ``clip_transform``.

    Frames are taken at 8-bit levels (as read from a file), resized by torchvision (bicubic short
    side, no antialias), centre-cropped, divided by 255 and CLIP-normalised. VBench resizes float
    frames for aesthetic_quality (its ``load_video``) and uint8 frames, rounded back to uint8, for
    overall_consistency (decord's torch bridge): ``uint8_resize`` picks the latter.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = to_uint8_levels(frames)
    if uint8_resize:
        x = x.to(torch.uint8)
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=False)
    x = TF.center_crop(x, [size, size]).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def middle_frame_indices(num_samples: int, num_frames: int, pad: bool = False) -> list[int]:
    """VBench's "middle" sampling: split into ``num_samples`` equal spans, take each span's middle frame.

    With ``pad`` a clip shorter than ``num_samples`` repeats its last frame up to ``num_samples``
    (VBench's reader does this; ViCLIP needs exactly its number of frames).
    """
    n = min(num_samples, num_frames)
    bounds = [int(i * num_frames / n) for i in range(n + 1)]
    idx = [(bounds[i] + bounds[i + 1] - 1) // 2 for i in range(n)]
    return idx + [idx[-1]] * (num_samples - n) if pad else idx


class _ClipScorer(BaseScorer):
    needs_weights = True

    def __init__(self, device: str | None, clip_weights: str | None, model_name: str, frame_chunk: int,
                 precision: str = "fp32"):
        super().__init__(device)
        path = find_weights(self.name, clip_weights, CLIP_FILE, CLIP_WHAT, "clip_weights")
        self.model = load_clip(model_name, path, self.device, self.name, precision)
        self.dtype = self.model.visual.conv1.weight.dtype  # frames enter in it, as OpenAI's encode_image casts them
        self.image_size = self.model.visual.image_size
        self.image_size = self.image_size[0] if isinstance(self.image_size, (tuple, list)) else self.image_size
        self.model_name = model_name
        self.frame_chunk = frame_chunk
        self.weights_used["clip"] = str(path)

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> L2-normalised CLIP image features ``[N, D]``."""
        feats = [self.model.encode_image(clip_preprocess(c, self.image_size).to(self.dtype)).float()
                 for c in frames.split(self.frame_chunk)]
        return F.normalize(torch.cat(feats), dim=-1)


class AestheticQuality(_ClipScorer):
    """LAION aesthetic predictor (linear head on CLIP image features) / 10, averaged over frames."""

    name = "aesthetic_quality"
    kind = "quality"
    weights_hint = f"clip_weights / head_weights or ${WEIGHTS_ENV}/{CLIP_FILE} and ${WEIGHTS_ENV}/{AESTHETIC_FILE}"

    def __init__(self, device: str | None = None, clip_weights: str | None = None, head_weights: str | None = None,
                 model_name: str = "ViT-L-14-quickgelu", frame_chunk: int = 32, precision: str = "fp32"):
        head_path = find_weights(
            self.name, head_weights, AESTHETIC_FILE,
            "the LAION aesthetic predictor head sa_0_4_vit_l_14_linear.pth (LAION-AI/aesthetic-predictor)",
            "head_weights",
        )
        super().__init__(device, clip_weights, model_name, frame_chunk, precision)
        state = load_state_dict(head_path)
        self.head = torch.nn.Linear(state["weight"].shape[1], 1)
        self.head.load_state_dict(state)
        self.head.eval().to(self.device)
        self.weights_used["aesthetic_head"] = str(head_path)
        self.version = f"vbench-aesthetic_quality-2/{model_name}+laion-linear"  # 2: VBench's resize
        if precision != "fp32":  # scores of another precision do not mix with fp32 ones
            self.version += f"/{precision}"

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        feats = self.image_features(videos.reshape(b * f, *videos.shape[2:]))
        return (self.head(feats).reshape(b, f).double() / 10.0).mean(dim=1)


VICLIP_FILE = "viclip/ViClip-InternVid-10M-FLT.pth"
VICLIP_WHAT = "ViCLIP-L/14 (ViClip-InternVid-10M-FLT.pth from OpenGVLab/ViCLIP, the file VBench uses)"
OVERALL_BACKENDS = ("auto", "viclip", "clip")


class OverallConsistency(BaseScorer):
    """Text-video cosine similarity over 8 middle frames: ViCLIP as in VBench, or a CLIP frame average.

    ``backend="viclip"`` encodes the 8 frames jointly with ViCLIP (VBench's definition; its
    normalisation constant 0.364 was set for this model). ``backend="clip"`` averages CLIP image
    features of the 8 frames (an approximation for when ViCLIP's checkpoint is not at hand).
    ``auto`` takes ViCLIP when its checkpoint is found (``viclip_weights`` or
    ``$VIDEOTUNA_WEIGHTS/viclip/ViClip-InternVid-10M-FLT.pth``), CLIP otherwise.
    """

    name = "overall_consistency"
    kind = "semantic"
    needs_weights = True

    def __init__(self, device: str | None = None, backend: str = "auto", viclip_weights: str | None = None,
                 clip_weights: str | None = None, model_name: str = "ViT-L-14-quickgelu", num_frames: int = 8,
                 frame_chunk: int = 32):
        super().__init__(device)
        self.backend = backend = pick_backend(self.name, "backend", backend, OVERALL_BACKENDS, viclip_weights,
                                              VICLIP_FILE, "viclip", "clip")
        self.num_frames = num_frames
        self.frame_chunk = frame_chunk
        if backend == "viclip":
            reject_unused(self.name, backend, clip_weights=(clip_weights, None),
                          model_name=(model_name, "ViT-L-14-quickgelu"), num_frames=(num_frames, 8))
            self.weights_hint = f"viclip_weights or ${WEIGHTS_ENV}/{VICLIP_FILE}"
            path = find_weights(self.name, viclip_weights, VICLIP_FILE, VICLIP_WHAT, "viclip_weights")
            try:
                self.viclip = shared_viclip(path, self.device)
            except UserError as exc:
                raise UserError(f"{self.name}: {exc}") from None
            self.tokenizer = viclip_tokenizer(self.viclip.cfg.context_length)
            self.weights_used["viclip"] = str(path)
            self.version = "vbench-overall_consistency-1/viclip"
        else:
            reject_unused(self.name, backend, viclip_weights=(viclip_weights, None))
            self.weights_hint = (f"clip_weights or ${WEIGHTS_ENV}/{CLIP_FILE} "
                                 f"(ViCLIP, VBench's model: viclip_weights or ${WEIGHTS_ENV}/{VICLIP_FILE})")
            self.clip = _FrameClip(self.name, device, clip_weights, model_name, frame_chunk)
            self.weights_used.update(self.clip.weights_used)
            self.version = f"overall_consistency-clip-2/{model_name}"  # 2: VBench's resize

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if self.backend == "viclip":
            return self._score_viclip(videos, prompts)
        idx = middle_frame_indices(self.num_frames, videos.shape[1])
        b, n = videos.shape[0], len(idx)
        frames = videos[:, idx].reshape(b * n, *videos.shape[2:])
        video_feats = F.normalize(self.clip.image_features(frames).reshape(b, n, -1).mean(dim=1), dim=-1)
        tokens = self.clip.tokenizer(list(prompts)).to(self.device)
        text = F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1)
        return (video_feats * text).sum(-1).double()

    def _score_viclip(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cfg = self.viclip.cfg
        idx = middle_frame_indices(cfg.num_frames, videos.shape[1], pad=True)
        b = videos.shape[0]
        frames = clip_preprocess(videos[:, idx].reshape(b * len(idx), *videos.shape[2:]), cfg.image_size, uint8_resize=True)
        clips_per_pass = max(1, self.frame_chunk // len(idx))  # frame_chunk counts frames, as elsewhere
        video = torch.cat([self.viclip.encode_video(c)
                           for c in frames.reshape(b, len(idx), *frames.shape[1:]).split(clips_per_pass)])
        text = self.viclip.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return (video * text).sum(-1).double()


class _FrameClip(_ClipScorer):
    """The CLIP model and image features of ``overall_consistency``'s CLIP backend."""

    def __init__(self, name: str, device: str | None, clip_weights: str | None, model_name: str, frame_chunk: int):
        import open_clip

        self.name = name
        super().__init__(device, clip_weights, model_name, frame_chunk)
        self.tokenizer = open_clip.get_tokenizer(model_name)
