"""Settings of a ``shard`` run, and the fingerprint of those that change output bytes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from uge_protect.logs import LOG_JSON_HELP, QUIET_HELP
from uge_protect.options import epsilon_option, option
from uge_protect.shards.decode import DEFAULT_MAX_PIXELS, RESIZE_MODES
from uge_protect.shards.tario import DEFAULT_MAX_SAMPLE_BYTES

IMAGE_FORMATS = ("png", "webp", "jpeg")
#: zlib strategies for PNG. Huffman-only suits perturbed images: the noise leaves few
#: repeats for LZ77 to find, so it is faster and about as small or smaller.
PNG_STRATEGIES = {"default": 0, "filtered": 1, "huffman": 2, "rle": 3}


@dataclass
class MethodOptions:
    """What ``shard`` hands every method besides the method's own options."""

    epsilon: float = epsilon_option()


@dataclass
class ShardJobConfig:
    """Everything ``uge-protect shard`` needs besides the method object."""

    inputs: list[str] = option(cli=False, help="Input tar shards: paths, globs, {000..099} patterns or URLs.")
    output: str = option(cli=False, help="Output directory.")
    seed: int = option(0, help="Seed for per-sample randomness (combined with each key).")
    batch_size: int = option(64, help="Images per accelerator pass.")
    num_workers: int = option(2, flag="--workers", help="DataLoader worker processes that read and decode.")
    encode_threads: int = option(2, help="Threads that encode protected images (0: encode in the main thread).")
    image_format: str = option("png", help="png, webp (lossless) or jpeg (lossy).")
    allow_lossy: bool = option(False, flag="--allow-lossy", help=(
        "Accept lossy output (jpeg, lossy webp): weakens protection."))
    quality: int = option(95, help="Quality of lossy formats.")
    png_compress_level: int = option(1, flag="--png-compression", help="PNG zlib level 0-9 (1: fast, larger files).")
    png_strategy: str = option("huffman", help=(
        "zlib strategy: huffman (fast, small for perturbed images), default, filtered, rle."))
    image_size: int | None = option(None, default_help="as stored", help="Resize to this training resolution first.")
    resize_mode: str = option("none", help=f"{' | '.join(RESIZE_MODES)}.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="Reject images with more pixels (decompression bombs).")
    #: Does not change output bytes.
    max_batch_pixels: int = option(DEFAULT_MAX_PIXELS, help="Most decoded pixels per batch (bounds memory; output unchanged).")
    max_sample_bytes: int = option(DEFAULT_MAX_SAMPLE_BYTES, help=(
        "Most bytes of one sample's members; larger samples fail unread (sample_too_large)."))
    caption_field: str | None = option(None, default_help="txt", help="Read captions from this json field instead of txt.")
    label_field: str | None = option(None, default_help="cls", help="Read labels from this json field instead of cls.")
    mixed_precision: str = option("no", help="no | fp16 | bf16 for the method's pass.")
    overwrite: bool = option(False, flag="--overwrite", help="Replace output of a different configuration.")
    quiet: bool = option(False, flag="--quiet", short="-q", help=QUIET_HELP)
    log_json: str | None = option(None, default_help="none", help=LOG_JSON_HELP)
    #: Merged over the directory. It does not change output bytes, so it is not part of the fingerprint.
    max_failure_rate: float = option(0.5, help="Exit 1 when a larger share of the samples failed (0-1; 1: never).")

    @property
    def lossy(self) -> bool:
        """True when written images do not keep the exact protected pixels."""
        return self.image_format == "jpeg" or (self.image_format == "webp" and self.allow_lossy)

    def validate(self) -> None:
        """Raise ValueError for inconsistent settings."""
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"unknown image format {self.image_format!r}; choose {', '.join(IMAGE_FORMATS)}"
            )
        if self.image_format == "jpeg" and not self.allow_lossy:
            raise ValueError(
                "jpeg re-encoding destroys much of the perturbation; pass --allow-lossy to accept it"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; choose {', '.join(RESIZE_MODES)}")
        if self.resize_mode != "none" and not self.image_size:
            raise ValueError(f"--resize-mode {self.resize_mode} needs --image-size N")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError("--image-size must be positive")
        if self.batch_size <= 0:
            raise ValueError("--batch-size must be positive")
        if self.num_workers < 0 or self.encode_threads < 0:
            raise ValueError("--workers and --encode-threads must be >= 0")
        if not 1 <= self.quality <= 100:
            raise ValueError("--quality must be between 1 and 100")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError("--png-compression must be between 0 and 9")
        if self.png_strategy not in PNG_STRATEGIES:
            raise ValueError(f"unknown PNG strategy {self.png_strategy!r}; choose {', '.join(PNG_STRATEGIES)}")
        if self.max_pixels <= 0:
            raise ValueError("--max-pixels must be positive")
        if self.max_batch_pixels <= 0:
            raise ValueError("--max-batch-pixels must be positive")
        if self.max_sample_bytes <= 0:
            raise ValueError("--max-sample-bytes must be positive")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("--mixed-precision must be no, fp16 or bf16")
        if not 0 <= self.max_failure_rate <= 1:
            raise ValueError("--max-failure-rate must be between 0 and 1 (1 accepts any number of failures)")

    def output_settings(self) -> dict[str, Any]:
        """Settings that change the bytes written (part of the configuration fingerprint)."""
        keys = (
            "seed", "image_format", "allow_lossy", "quality", "png_compress_level", "png_strategy", "image_size",
            "resize_mode", "max_pixels", "max_sample_bytes", "caption_field", "label_field", "mixed_precision",
        )
        return {k: asdict(self)[k] for k in keys}


def config_fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of a canonical JSON encoding of ``settings``."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
