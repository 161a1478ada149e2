"""Optical flow between frame pairs: OpenCV DIS or Farneback (no weights), RAFT from a local checkpoint.

Frames enter as uint8 RGB ``[N, H, W, 3]`` numpy pairs; flow leaves as float32 ``[N, H, W, 2]``
in pixels, (dx, dy), mapping each pixel of the first frame to the second.

RAFT runs on torchvision's ``raft_large`` network and loads either of two checkpoints of it:
torchvision's own (``raft_large_C_T_V2-1bb1363a.pth``) or princeton-vl's original RAFT, the file
VBench's ``dynamic_degree`` uses (``raft-things.pth``; keys ``module.fnet.*``, ``module.cnet.*``,
``module.update_block.*``), whose keys :func:`princeton_raft_to_torchvision` renames. The two code
bases compute the same network (same layers, correlation lookup order and convex upsampling), so
the renamed weights give princeton's flow. Frames are padded as princeton's ``InputPadder`` does.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.amt import pad_amounts
from videotuna_dpo.scoring.base import WEIGHTS_ENV, find_weights, in_weights_dir, load_state_dict

FLOW_METHODS = ("dis", "farneback", "raft")
RAFT_FILE = "raft/raft_large_C_T_V2-1bb1363a.pth"  # torchvision's checkpoint, looked for first
RAFT_VBENCH_FILES = ("raft/raft_model.pth", "raft/raft-things.pth")  # princeton-vl's, as VBench uses it
RAFT_WHAT = (
    "torchvision's RAFT-large checkpoint (raft_large_C_T_V2-1bb1363a.pth) or VBench's RAFT checkpoint "
    "(princeton-vl raft-things.pth, which VBench keeps as raft_model/models/raft-things.pth; also looked for as "
    f"${WEIGHTS_ENV}/{RAFT_VBENCH_FILES[0]} and ${WEIGHTS_ENV}/{RAFT_VBENCH_FILES[1]})"
)
# torchvision's RAFT refuses feature maps (1/8 of the input) under 16 cells; princeton's runs on them but
# its coarsest correlation level is then 1 cell wide and its lookup divides by 0: NaN flow.
RAFT_MIN_SIDE = 128
RAFT_CORR_BUDGET = 2 << 30  # bytes of correlation volume per batch of pairs

# princeton-vl RAFT (VBench's third_party/RAFT) -> torchvision raft_large: (pattern, replacement).
# A replacement None marks an alias: princeton's ResidualBlock registers its third norm twice, as
# ``norm3`` and as ``downsample.1``; loading gives the module the ``downsample.1`` values (loaded last).
_PRINCETON_RULES = [(re.compile(p), r) for p, r in (
    (r"^(fnet|cnet)\.conv1\.(weight|bias)$", r"\1.convnormrelu.0.\2"),
    (r"^(fnet|cnet)\.norm1\.(\w+)$", r"\1.convnormrelu.1.\2"),
    (r"^(fnet|cnet)\.conv2\.(weight|bias)$", r"\1.conv.\2"),
    (r"^(fnet|cnet)\.(layer[123]\.[01])\.conv([12])\.(weight|bias)$", r"\1.\2.convnormrelu\3.0.\4"),
    (r"^(fnet|cnet)\.(layer[123]\.[01])\.norm([12])\.(\w+)$", r"\1.\2.convnormrelu\3.1.\4"),
    (r"^(fnet|cnet)\.(layer[123]\.0)\.downsample\.([01])\.(\w+)$", r"\1.\2.downsample.\3.\4"),
    (r"^(fnet|cnet)\.(layer[123]\.0)\.norm3\.(\w+)$", None),
    (r"^update_block\.encoder\.convc([12])\.(weight|bias)$", r"update_block.motion_encoder.convcorr\1.0.\2"),
    (r"^update_block\.encoder\.convf([12])\.(weight|bias)$", r"update_block.motion_encoder.convflow\1.0.\2"),
    (r"^update_block\.encoder\.conv\.(weight|bias)$", r"update_block.motion_encoder.conv.0.\1"),
    (r"^update_block\.gru\.conv([zrq])([12])\.(weight|bias)$", r"update_block.recurrent_block.convgru\2.conv\1.\3"),
    (r"^update_block\.flow_head\.conv([12])\.(weight|bias)$", r"update_block.flow_head.conv\1.\2"),
    (r"^update_block\.mask\.0\.(weight|bias)$", r"mask_predictor.convrelu.0.\1"),
    (r"^update_block\.mask\.2\.(weight|bias)$", r"mask_predictor.conv.\1"),
)]
_ENCODER_NAMES = {"fnet": "feature_encoder", "cnet": "context_encoder"}


def princeton_raft_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """princeton-vl RAFT (large) state dict, ``module.`` already stripped -> torchvision ``raft_large`` keys.

    Tensors are passed through unchanged (both code bases store every weight in the same layout);
    a key no rule knows raises ``KeyError`` naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, replacement in _PRINCETON_RULES:
            if pattern.match(key):
                if replacement is not None:
                    new = pattern.sub(replacement, key)
                    head, _, rest = new.partition(".")
                    out[f"{_ENCODER_NAMES.get(head, head)}.{rest}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"keys of no princeton-vl RAFT-large layer: {', '.join(sorted(unknown)[:8])}")
    return out


def raft_checkpoint_format(state: dict[str, torch.Tensor]) -> str | None:
    """``"torchvision"``, ``"princeton"`` (VBench's raft-things) or None, from the keys."""
    if "feature_encoder.convnormrelu.0.weight" in state and "update_block.flow_head.conv2.weight" in state:
        return "torchvision"
    if "fnet.conv1.weight" in state and "update_block.flow_head.conv2.weight" in state:
        return "princeton"
    return None


def load_raft(path: Path) -> torch.nn.Module:
    """torchvision ``raft_large`` (eval mode) with the weights of either checkpoint format, loaded strictly."""
    from torchvision.models.optical_flow import raft_large

    state = load_state_dict(Path(path))
    fmt = raft_checkpoint_format(state)
    if fmt is None:
        raise UserError(
            f"{path}: not a RAFT-large checkpoint: expected torchvision's raft_large keys "
            "(feature_encoder.*, context_encoder.*, update_block.*, mask_predictor.*) or princeton-vl/VBench "
            f"RAFT keys ([module.]fnet.*, cnet.*, update_block.*); found {', '.join(sorted(state)[:4]) or 'no keys'}"
        )
    if fmt == "princeton":
        try:
            state = princeton_raft_to_torchvision(state)
        except KeyError as err:
            raise UserError(f"{path}: princeton-vl RAFT checkpoint of another architecture "
                            f"(only RAFT-large, e.g. raft-things.pth, is supported): {err.args[0]}") from None
    model = raft_large(weights=None, progress=False)
    target = model.state_dict()
    problems = [
        f"{what} {', '.join(keys[:6])}" for what, keys in (
            ("missing", sorted(set(target) - set(state))),
            ("unexpected", sorted(set(state) - set(target))),
            ("wrong shape", sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)),
        ) if keys
    ]
    if problems:
        raise UserError(f"{path}: {fmt} RAFT checkpoint does not match RAFT-large: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def find_raft_weights(scorer: str, explicit: str | os.PathLike | None) -> Path:
    """``explicit``, else ``$VIDEOTUNA_WEIGHTS/``:data:`RAFT_FILE`, else :data:`RAFT_VBENCH_FILES` there."""
    if not explicit and not in_weights_dir(RAFT_FILE):
        for relative in RAFT_VBENCH_FILES:
            if in_weights_dir(relative):
                return Path(os.environ[WEIGHTS_ENV]).expanduser() / relative
    return find_weights(scorer, explicit, RAFT_FILE, RAFT_WHAT, "raft_weights")


def raft_padding(h: int, w: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(VBench's pad, the pad RAFT runs with) as (left, right, top, bottom).

    VBench (princeton's ``InputPadder``, mode 'sintel') pads each side to a multiple of 8, half of it
    before, the rest after. Frames still under :data:`RAFT_MIN_SIDE` (where VBench's RAFT gives NaN)
    are padded further, evenly, to that size.
    """
    vb = pad_amounts(h, w, 8)  # the same split as AMT-S's padder
    eh, ew = max(0, RAFT_MIN_SIDE - h - vb[2] - vb[3]), max(0, RAFT_MIN_SIDE - w - vb[0] - vb[1])
    run = (vb[0] + ew // 2, vb[1] + ew - ew // 2, vb[2] + eh // 2, vb[3] + eh - eh // 2)
    return vb, run


_pools: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_pools.clear)  # a forked child has none of the parent's pool threads


def flow_threads() -> int:
    """Threads that measure OpenCV flow pairs at once: the smaller of OpenCV's and torch's thread counts
    (``cv2.setNumThreads``, ``torch.set_num_threads`` or ``OMP_NUM_THREADS``), at least 1.

    DIS on a pair of frames of a few hundred pixels keeps about one core busy whatever OpenCV's
    setting, so pairs are spread over threads; each pair's flow is the same as measured alone.
    """
    return max(1, min(cv2.getNumThreads(), torch.get_num_threads()))


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flow")
    return _pools[workers]


def _new_dis():
    """A fresh DIS estimator, one per pair: an object reused across calls was seen to give another flow for the
    same pair after earlier calls (the test suite caught it), so a pair's flow would depend on what ran before."""
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


class FlowEstimator:
    """Flow for many frame pairs at once; ``method`` is one of :data:`FLOW_METHODS`."""

    def __init__(self, method: str = "dis", scorer: str = "flow", raft_weights: str | None = None,
                 device: torch.device | str = "cpu", raft_iters: int = 20):
        if method not in FLOW_METHODS:
            raise UserError(f"{scorer}: unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}")
        self.method = method
        self.device = torch.device(device)
        self.weights: Path | None = None
        self.raft_iters = raft_iters  # VBench runs RAFT with 20 refinement iterations
        if method == "raft":
            self.weights = find_raft_weights(scorer, raft_weights)
            self._raft = load_raft(self.weights).to(self.device)

    @property
    def key(self) -> tuple:
        """What the flow depends on besides the frames: estimators with equal keys give the same flow."""
        if self.method == "raft":
            return (self.method, str(self.weights), self.raft_iters, str(self.device))
        return (self.method,)

    @property
    def label(self) -> str:
        return {"dis": "opencv-dis-medium", "farneback": "opencv-farneback", "raft": "raft-large"}[self.method]

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` x 2 -> float32 flow ``[N, H, W, 2]`` from ``first`` to ``second``."""
        both = np.concatenate([first, second])
        n = first.shape[0]
        return self.pairs(both, [(i, n + i) for i in range(n)])

    def pairs(self, frames: np.ndarray, pairs: list[tuple[int, int]], vbench_padded: bool = False) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` and index pairs (i, j) -> float32 flow ``[P, H, W, 2]`` from frame i to j.

        ``vbench_padded`` (RAFT only): the flow over the frame as VBench pads it for RAFT, sides rounded
        up to multiples of 8 (VBench's dynamic_degree measures that whole padded flow).
        """
        if self.method == "raft":
            return self._raft_flow(frames[[i for i, _ in pairs]], frames[[j for _, j in pairs]], vbench_padded)
        used = sorted({k for pair in pairs for k in pair})
        gray = {k: cv2.cvtColor(frames[k], cv2.COLOR_RGB2GRAY) for k in used}  # once per frame
        out = np.empty((len(pairs),) + frames.shape[1:3] + (2,), dtype=np.float32)

        def measure(p: int) -> None:
            i, j = pairs[p]
            if self.method == "dis":
                out[p] = _new_dis().calc(gray[i], gray[j], None)
            else:
                out[p] = cv2.calcOpticalFlowFarneback(gray[i], gray[j], None, 0.5, 3, 15, 3, 5, 1.2, 0)

        workers = flow_threads()
        if workers > 1 and len(pairs) > 1:  # OpenCV releases the GIL: pairs run on every core
            list(_pool(workers).map(measure, range(len(pairs))))
        else:
            for p in range(len(pairs)):
                measure(p)
        return out

    @torch.no_grad()
    def _raft_flow(self, first: np.ndarray, second: np.ndarray, vbench_padded: bool = False) -> np.ndarray:
        n, h, w, _ = first.shape
        vb, pad = raft_padding(h, w)
        # Keep the flow of the frame itself, or of VBench's padded frame, inside the padding RAFT ran with.
        keep = vb if vbench_padded else (0, 0, 0, 0)
        top, left = pad[2] - keep[2], pad[0] - keep[0]
        out_h, out_w = h + keep[2] + keep[3], w + keep[0] + keep[1]
        cells = ((h + pad[2] + pad[3]) // 8) * ((w + pad[0] + pad[1]) // 8)
        chunk = max(1, RAFT_CORR_BUDGET // (cells * cells * 4 * 4 // 3 + 1))

        def prep(x: np.ndarray) -> torch.Tensor:
            # 2 * (x / 255) - 1 as princeton's RAFT (and torchvision's preset) normalise, bit for bit.
            t = 2.0 * (torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 255.0) - 1.0
            return torch.nn.functional.pad(t, pad, mode="replicate")

        out = []
        for s in range(0, n, chunk):
            flows = self._raft(prep(first[s:s + chunk]), prep(second[s:s + chunk]), num_flow_updates=self.raft_iters)
            out.append(flows[-1][:, :, top:top + out_h, left:left + out_w].permute(0, 2, 3, 1).float().cpu())
        return torch.cat(out).numpy()


def resize_for_flow(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` -> same with the short side at most ``short_side`` (area-resampled)."""
    h, w = frames.shape[1:3]
    if not short_side or min(h, w) <= short_side:
        return frames
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return gx, gy


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out(x) = image(x + flow(x))``; image ``[H, W, C]`` float32, flow ``[H, W, 2]``."""
    gx, gy = _pixel_grid(*flow.shape[:2])
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
