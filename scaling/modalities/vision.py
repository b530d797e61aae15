"""Vision (docs/data2vec.md §3.3, docs/data2vec2.md): images decoded by torchvision, cropped and flipped
(BEiT's augmentation), cut into patches; v1 masks BEiT blocks, 2.0 inverse blocks. The modality's pieces
behind :data:`SPEC` (:mod:`scaling.modalities`)."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from typing import Optional

import numpy as np
import torch

from scaling.config import ModelConfig, Recipe
from scaling.data.collate import SampleProcessor, _noise_seeds, _payload, _views, _views_batch
from scaling.data.quality import BadSample, short_error
from scaling.data.shards import ignore_warning, quiet_tv_io
from scaling.masking import inverse_block_mask_2d, sample_rng, vision_block_mask
from scaling.modalities import ModalitySpec


class VisionProcessor(SampleProcessor):
    modality = "vision"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torchvision.transforms import v2

        vc, dc = self.model_cfg.vision, self.data_cfg.vision
        C = vc.channels
        if C not in _READ_MODES:
            raise ValueError(f"model.vision.channels must be 1, 3 or 4, got {C}")
        if len(dc.mean) < C or len(dc.std) < C:
            raise ValueError(f"data.vision.mean/std need at least {C} entries (model.vision.channels)")
        size = vc.image_size
        self._size = size
        if dc.augment:
            self._geometric = v2.RandomResizedCrop(
                (size, size), scale=tuple(dc.crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            )
        else:
            self._geometric = v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        # v2.RandomHorizontalFlip's rule, drawn here so the flag can travel with a uint8 image: it
        # flips when torch.rand(1) < p, drawn right after the crop's draws (as Compose([crop, flip]) did).
        self._flip_p = 0.5 if dc.augment else 0.0
        self._to_float = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(dc.mean[:C]), list(dc.std[:C]))]
        )
        self._mean_C = torch.tensor(list(dc.mean[:C]), dtype=torch.float32)
        self._std_C = torch.tensor(list(dc.std[:C]), dtype=torch.float32)
        self._grid = (size // vc.patch_size, size // vc.patch_size)

    def decode(self, raw: dict) -> torch.Tensor:
        data = _payload(raw, ("png", "jpg", "jpeg", "webp"))
        return decode_image_bytes(data, self.model_cfg.vision.channels, self.data_cfg.vision.max_pixels)

    def items(self, image: torch.Tensor, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
        """``image``: uint8 ``[C,H,W]`` with the model's channel count."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != self.model_cfg.vision.channels:
            raise ValueError(f"expected a uint8 [{self.model_cfg.vision.channels},H,W] image, got {image.dtype} {tuple(image.shape)}")
        rng = sample_rng(self.seed, epoch, sample_id)
        torch_seed = int(rng.integers(0, 2**63 - 1))
        flip = False
        if self.data_cfg.vision.augment or tuple(image.shape[1:]) != (self._size, self._size):
            # The augmentation draws from torch's global RNG: fork it and seed it per sample so
            # the result depends on this sample only (and the caller's RNG stream is untouched).
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also seeds CUDA, whose lazy-init bookkeeping
                # (a stack trace per call on CUDA builds) cost half of a small image's processing.
                torch.default_generator.manual_seed(torch_seed)
                image = self._geometric(image)  # uint8 in, uint8 out
                flip = self._flip_p > 0 and bool(torch.rand(1) < self._flip_p)
        extra = {}
        if self.model_cfg.version == 2:  # M views of the sample, each keeping the same number of patches
            m2 = self.masking_cfg.vision_v2
            mask = inverse_block_mask_2d(rng, self._grid, ratio=m2.ratio, adjust=m2.adjust, block=m2.block,
                                         num_clones=self.masking_cfg.clones)
            extra["noise_seed"] = _noise_seeds(rng, self.masking_cfg.clones)
        else:
            mask = vision_block_mask(rng, self._grid, self.masking_cfg.vision)
        if self.device_stage:
            return [{"image_uint8": image.contiguous(), "hflip": flip, "mask": mask, "label": label,
                     "id": int(sample_id), **extra}]
        if flip:
            image = image.flip(-1)  # what v2.RandomHorizontalFlip does to an image tensor
        pixels = self._to_float(image).contiguous()
        return [{"image": pixels, "mask": mask, "label": label, "id": int(sample_id), **extra}]

    def inputs(self, items: list[dict]) -> dict[str, torch.Tensor]:
        B = len(items)
        batch: dict[str, torch.Tensor] = {}
        if "image_uint8" in items[0]:
            batch["image_uint8_BCHW"] = torch.stack([it["image_uint8"] for it in items])
            batch["hflip_B"] = torch.tensor([it["hflip"] for it in items], dtype=torch.bool)
            # Per row, so that every tensor of a batch is indexed by row (a caller may select rows).
            batch["pixel_mean_BC"] = self._mean_C.repeat(B, 1)
            batch["pixel_std_BC"] = self._std_C.repeat(B, 1)
        else:
            batch["image_BCHW"] = torch.stack([it["image"] for it in items])
        mask = torch.stack([torch.from_numpy(it["mask"]) for it in items])
        views = _views(items)
        if views:  # data2vec 2.0: [B, M, T] -> M consecutive rows per sample, and the kept patches
            mask = mask.flatten(0, 1)
            batch.update(_views_batch(items, mask, None, views))
        batch["mask_BT"] = mask
        return batch


# ----------------------------------------------------------------------------- decoding
# What a model with C channels reads (PIL's mode names); images of other modes are converted.
_READ_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Formats a sample's bytes may hold (PIL's names; MPO is a JPEG with more images, from cameras). PIL
# tells them by their content, so a GIF in a png member is still a GIF. Other PIL plugins (TGA has no
# magic number) could take random bytes for an image, so they are not tried.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
# What torchvision's codecs decode (one frame); the rest, and every animated image, go through PIL.
# Not PNG: torchvision 0.29's decode_png crashes the process (SIGSEGV after "libpng error: Not enough
# image data") on a PNG whose IDAT is short or corrupt, where PIL raises; PNG is lossless, so PIL
# gives the same pixels.
_TV_FORMATS = {"JPEG", "MPO", "WEBP", "GIF"}
# Errors PIL's plugins raise on bad bytes (a truncated PNG raises OSError or SyntaxError from its
# chunk reader, a bad header struct.error or EOFError); torchvision's codecs raise RuntimeError.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


@functools.cache
def _pil_formats() -> tuple[str, ...]:
    """The formats of :data:`IMAGE_FORMATS` this PIL build has (PIL's plugin set-up, once per process)."""
    from PIL import Image

    Image.init()  # registers every plugin (Image.open alone loads five, not MPO, WebP or TIFF)
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def image_header(data: bytes):
    """PIL's lazy image of encoded bytes: the header is read, no pixel is decoded. ``BadSample``
    ``decode_error`` when PIL does not recognise :data:`IMAGE_FORMATS` in it."""
    from PIL import Image, UnidentifiedImageError

    formats = _pil_formats()
    # The pixel limit is data.vision.max_pixels, checked by the caller from the header, not PIL's warning
    # (a process-wide filter: see ignore_warning).
    ignore_warning(Image.DecompressionBombWarning)
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exn:  # past 2 x PIL's MAX_IMAGE_PIXELS: refused from the header
        raise BadSample("too_large", f"image header: {short_error(exn, 200)}") from None
    except UnidentifiedImageError:
        raise BadSample("decode_error", f"not a decodable image (unknown format): not "
                        f"{'/'.join(f.lower() for f in IMAGE_FORMATS)} (starts with {bytes(data[:8])!r})") from None
    except _PIL_ERRORS as exn:
        raise BadSample("decode_error", f"not a decodable image: its header does not parse: {short_error(exn)}") from None


def decode_image_bytes(data: bytes, channels: Optional[int], max_pixels: int, *,
                       limit_name: str = "data.vision.max_pixels") -> torch.Tensor:
    """Encoded image bytes -> uint8 ``[channels,H,W]``, or :class:`BadSample`.

    The size is read from the header first (PIL), and an image of more than ``max_pixels`` pixels is
    ``too_large`` before any pixel is decoded (a small PNG can declare 20000 x 20000). Animated images
    give their first frame; 16-bit images are scaled to 8 bits; palette, CMYK, grayscale and alpha
    images are converted to ``channels`` (1: gray, 3: RGB without alpha, 4: RGBA). ``channels`` None
    keeps gray images gray and makes the others RGB (alpha dropped), which ``scaling-shards`` stores.
    JPEG, WebP and still GIF are decoded by torchvision (the pixels the loader always gave), PNG and the
    rest by PIL (:data:`_TV_FORMATS`). ``limit_name``: what the too_large message calls ``max_pixels``."""
    from torchvision.transforms.v2 import functional as F

    header = image_header(data)
    with header:
        w, h = header.size
        if w <= 0 or h <= 0:
            raise BadSample("empty", f"image of size {w}x{h}")
        if w * h > max_pixels:
            raise BadSample("too_large", f"{w}x{h} image ({w * h} pixels) > {limit_name} {max_pixels}")
        if channels is None:
            channels = 1 if header.mode in ("1", "L", "LA", "La", "I", "F") or header.mode.startswith("I;16") else 3
        animated = bool(getattr(header, "is_animated", False))
        if header.format in _TV_FORMATS and not animated:
            image = _decode_tv(data, channels, header.format)
        else:
            image = _decode_pil(header, channels)
    if image.dtype != torch.uint8:  # 16-bit gray (PIL's I;16): scaled as ToDtype does
        image = F.to_dtype(image, torch.uint8, scale=True)
    image = _match_channels(image, channels)
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise BadSample("empty", f"image of size {tuple(image.shape)}")
    return image.contiguous()


def _decode_tv(data: bytes, channels: int, fmt: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    # JPEG has no alpha mode (decode_jpeg refuses RGB_ALPHA): decoded as RGB, the alpha added after.
    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB, 4: ImageReadMode.RGB_ALPHA}[channels]
    if channels == 4 and fmt in ("JPEG", "MPO"):
        mode = ImageReadMode.RGB
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with quiet_tv_io():
            image = decode_image(buf, mode=mode)
    except (RuntimeError, ValueError) as exn:  # torchvision's codecs raise RuntimeError on bad bytes
        raise BadSample("decode_error", f"not a decodable image ({fmt.lower()}): {short_error(exn)}") from None
    return image[0] if image.ndim == 4 else image  # a GIF decodes to [frames, C, H, W]


def _decode_pil(header, channels: int) -> torch.Tensor:
    """The first frame through PIL (PNG, animated images, BMP, TIFF)."""
    if header.mode in ("I", "F"):  # 32-bit int/float pixels have no standard range
        raise BadSample("decode_error", f"not a decodable image ({header.format.lower()}): mode {header.mode} "
                        "(32-bit pixels) is not supported")
    try:
        header.seek(0)
        if header.mode.startswith("I;16"):  # 16-bit gray: scaled to 8 bits, not clipped as convert("L") does
            arr = np.array(header, dtype=np.uint16)[None]
        else:
            arr = np.array(header.convert(_READ_MODES[channels]))
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    except _PIL_ERRORS as exn:
        raise BadSample("decode_error", f"not a decodable image ({header.format.lower()}): {short_error(exn)}") from None
    return torch.from_numpy(np.ascontiguousarray(arr))


def _match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """``image`` with ``channels`` channels; codecs do not always honour the asked mode (a GIF is
    always RGB, a WebP always RGB(A), a JPEG has no alpha, a 16-bit gray PNG stays gray)."""
    from torchvision.transforms.v2 import functional as F

    c = image.shape[0]
    if c == channels:
        return image
    color = image[:3] if c >= 3 else image[:1].expand(3, -1, -1)
    if channels == 1:
        return F.rgb_to_grayscale(color) if c >= 3 else image[:1]
    if channels == 3:
        return color
    alpha = image[3:4] if c == 4 else image[1:2] if c == 2 else torch.full_like(image[:1], 255)
    return torch.cat([color, alpha])


# ----------------------------------------------------------------------------- synthetic samples
def synthetic_sample(source, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """A linear colour gradient with 0-3 rectangles on it; the label is the number of rectangles."""
    vc = source.model_cfg.vision
    S, C = vc.image_size, vc.channels
    # Background: a linear gradient between two colours in a random direction.
    c0, c1 = rng.uniform(0, 255, size=(2, C))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:S, 0:S] / max(S - 1, 1)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    img = c0[:, None, None] + (c1 - c0)[:, None, None] * ramp[None]
    n_rect = int(rng.integers(0, 4))
    for _ in range(n_rect):
        h, w = rng.integers(max(1, S // 8), max(2, S // 2) + 1, size=2)
        top, left = int(rng.integers(0, S - h + 1)), int(rng.integers(0, S - w + 1))
        img[:, top : top + h, left : left + w] = rng.uniform(0, 255, size=C)[:, None, None]
    return torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8)), n_rect


def device_item(source, g: int) -> dict:
    return {"id": int(g)}


def device_batch(maker, items: list[dict], ids_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Random pixels; BEiT block masks from a bank drawn once per source (:func:`_mask_bank`)."""
    from scaling.data.device import MASK_BANK_SIZE

    B, dev, gen = len(items), maker.device, maker.gen
    vc = maker.model_cfg.vision
    image_BCHW = torch.randn(B, vc.channels, vc.image_size, vc.image_size, generator=gen, device=dev)
    mask_BT = _mask_bank(maker)[torch.randint(MASK_BANK_SIZE, (B,), generator=gen, device=dev)]
    label_B = torch.randint(0, 4, (B,), generator=gen, device=dev)  # the CPU source's 0-3 rectangles
    return {"image_BCHW": image_BCHW, "mask_BT": mask_BT, "label_B": label_B, "sample_id_B": ids_B}


def _mask_bank(maker) -> torch.Tensor:
    """bool ``[MASK_BANK_SIZE, patches]``: BEiT block masks of the recipe, drawn once."""
    from scaling.data.device import _TAG_MASK_BANK, MASK_BANK_SIZE

    if maker.cache.get("mask_bank") is None:
        vc, cfg = maker.model_cfg.vision, maker.masking_cfg.vision
        grid = (vc.image_size // vc.patch_size, vc.image_size // vc.patch_size)
        masks = [vision_block_mask(sample_rng(maker.seed, _TAG_MASK_BANK, i), grid, cfg) for i in range(MASK_BANK_SIZE)]
        maker.cache["mask_bank"] = torch.from_numpy(np.stack(masks)).to(maker.device)
    return maker.cache["mask_bank"]


# ----------------------------------------------------------------------------- models
def build_v1(cfg: ModelConfig):
    from scaling.models.vision import VisionEncoder, VisionFrontend, beit_init_weights

    frontend = VisionFrontend(cfg, mask_token=True)
    # BEiT's order: the encoder's parameters are drawn after the mask token (v1 runs are unchanged by
    # the token's move to the frontend). The lm_head: trunc-normal(0.02), LayerNorm 1/0.
    return frontend, VisionEncoder(cfg, mask_token=frontend.mask_token), beit_init_weights


def build_v2(cfg: ModelConfig):
    from scaling.models.decoders import Decoder2d
    from scaling.models.vision import VisionFrontend
    from scaling.models.vision2 import VisionEncoder2

    return VisionFrontend(cfg), VisionEncoder2(cfg), Decoder2d(cfg)


def demo_data(out_dir) -> tuple[list[str], dict]:
    from scaling.data.demo_sets import build_vision_demo

    info = build_vision_demo(out_dir)
    return [f"data.train_shards={info['train_shards']}"], info


# ----------------------------------------------------------------------------- cost models
def positions(recipe: Recipe, audio_samples: Optional[int] = None) -> int:
    """Patches and CLS."""
    v = recipe.model.vision
    return (v.image_size // v.patch_size) ** 2 + 1


def frontend_flops(cfg: ModelConfig, T: int, audio_samples: Optional[int] = None) -> float:
    """The patch embedding of T patches."""
    vc = cfg.vision
    return 2.0 * vc.channels * vc.patch_size ** 2 * cfg.dim * T


def row_lengths(cfg: ModelConfig, batch: dict) -> tuple[list[int], None]:
    mask = batch["mask_BT"]
    return [int(mask.shape[1])] * int(mask.shape[0]), None


def frontend_bytes(recipe: Recipe, batch: int, positions: int, a: int) -> int:
    """The image and the patch embedding's output."""
    m = recipe.model
    v = m.vision
    return batch * (a * v.channels * v.image_size**2 + a * positions * m.dim)


def block_extra_bytes(m: ModelConfig, a: int) -> int:
    """BEiT's layer scale keeps its two inputs."""
    return a * 2 * m.dim if m.vision.layer_scale_init > 0 else 0


SPEC = ModalitySpec(
    name="vision", processor=VisionProcessor, build_v1=build_v1, build_v2=build_v2, hf_adapter="scaling.hf.vision",
    synthetic_sample=synthetic_sample, device_item=device_item, device_batch=device_batch, demo_data=demo_data,
    positions=positions, cls_positions=1, decoder_kernel_dims=2, frontend_flops=frontend_flops, teacher_embeds=True,
    positional_conv_flops=lambda cfg, T: 0.0, row_lengths=row_lengths, frontend_bytes=frontend_bytes,
    block_extra_bytes=block_extra_bytes,
)
