"""Frames -> model inputs: Qwen2-VL ``smart_resize``, normalisation and patchify; CLIP resize and crop.

Matches transformers' ``Qwen2VLVideoProcessor`` (5.23): bicubic antialiased resize of uint8 frames
to a uint8 result, then (x - 255 * mean) / (255 * std) in float32 with the OpenAI CLIP mean/std, then
the same patch order. Because the resize result is uint8, caching resized frames as uint8 loses
nothing: normalise + patchify of a cached clip is bit-identical to doing it right after decoding.
"""
from __future__ import annotations

import math

import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 128 * 28 * 28) -> tuple[int, int]:
    """(h, w) multiples of ``factor``, h * w within [min_pixels, max_pixels], aspect ratio kept as
    closely as possible: qwen-vl-utils' rule (never below ``factor`` on either side)."""
    if min(height, width) <= 0:
        raise ValueError(f"smart_resize: bad size {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: bicubic with antialias, as torchvision's
    ``resize`` (which the HF processor calls) on uint8 input."""
    import torchvision.transforms.v2.functional as tvF

    x = frames.permute(0, 3, 1, 2)  # (T, 3, H, W), a view
    if (x.shape[-2], x.shape[-1]) != (height, width):
        x = tvF.resize(x.contiguous(), [height, width], interpolation=tvF.InterpolationMode.BICUBIC,
                       antialias=True)
    return x.permute(0, 2, 3, 1).contiguous()


def normalize_patchify(frames: torch.Tensor, *, patch_size: int = 14, temporal_patch_size: int = 2,
                       merge_size: int = 2, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized uint8 frames [T, h, w, 3] -> (pixel_values_videos float32 [N, 3*tp*p*p], grid_thw int64 [1, 3]).

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (as HF); h and
    w must be multiples of patch_size * merge_size. Runs on the frames' device.
    """
    t, h, w, c = frames.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"normalize_patchify: {h}x{w} is not a multiple of {patch_size * merge_size}")
    m = torch.tensor(mean, dtype=torch.float32, device=frames.device) * 255
    s = torch.tensor(std, dtype=torch.float32, device=frames.device) * 255
    x = (frames.to(torch.float32) - m) / s  # (T, h, w, 3)
    x = x.permute(0, 3, 1, 2)  # (T, 3, h, w)
    if pad := -t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, m, m, c, tp, p, p): merge windows contiguous, as the vision tower expects
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[gt, gh, gw]], dtype=torch.int64)
    return pixel_values, grid


def clip_resize_crop(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 [K, H, W, 3] -> uint8 [K, size, size, 3]: shorter side to ``size`` (bicubic, antialias;
    the longer side rounded down, as CLIP's processor), then centre crop. ``size`` 0: unchanged."""
    if size <= 0:
        return frames
    (nh, nw), (top, left) = clip_geometry(frames.shape[1], frames.shape[2], size)
    x = resize_frames(frames, nh, nw)
    return x[:, top:top + size, left:left + size].contiguous()


def clip_geometry(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (crop top, left)) of CLIP's shorter-side resize + centre crop to ``size``."""
    if height <= width:
        nh, nw = size, int(size * width / height)
    else:
        nh, nw = int(size * height / width), size
    return (nh, nw), ((nh - size) // 2, (nw - size) // 2)


def clip_pixel_values(clip_frames: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """uint8 [K, S, S, 3] -> float32 [K, 3, S, S] normalised for CLIP's image tower (on their device)."""
    m = torch.tensor(mean, dtype=torch.float32, device=clip_frames.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=clip_frames.device).view(1, 3, 1, 1)
    return (clip_frames.permute(0, 3, 1, 2).to(torch.float32) / 255 - m) / s
