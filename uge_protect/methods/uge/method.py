"""``uge``: Ungeneralizable Examples (Ye & Wang, CVPR 2024), our reimplementation.

The protected data x + δ stays learnable for the owner's *authorized* network and teaches
every other network a shortcut that does not generalize. A generator makes the noise from
the image, δ = ε·tanh(G(x)), and is trained with three losses (:mod:`uge_protect.methods.uge.losses`):

* L_ud (undistillation): a student of another architecture, trained alongside on x + δ by
  distilling the authorized network, is given noise that makes its loss trivially low
  (min-min, as in EM): it learns the noise instead of the images;
* L_fd (feature distance): x + δ is pushed away from x in a frozen image-feature space that
  all architectures share (an open_clip image tower), and with misalignment toward the
  prototype of another class (a permutation of the classes drawn from the key);
* L_gm (gradient matching): the authorized network's gradients on x + δ match those on x at
  points of its training trajectory (snapshots taken while it is first trained on x).

Authorization (:mod:`uge_protect.methods.uge.key`). With the key projection on (the default)
the authorized network's first operation removes each pixel's colour component along a secret direction
v drawn from the key, and δ is written along v only: the authorized network sees exactly the
clean images (L_gm is then identically zero and is not computed), every other network sees
the noise. With ``key_projection=False`` the authorized network is the bare architecture,
initialised from the key, as in the paper, and L_gm is what keeps it learning.

Fitting is :mod:`uge_protect.methods.uge.fit`; this module applies a fitted artifact.
"""

from __future__ import annotations

from typing import Any

import torch

from uge_protect.errors import UserError
from uge_protect.methods.artifact import (artifact_fingerprint, check_config, check_fitted_epsilon, load_artifact,
    loading)
from uge_protect.methods.base import APPLY_CHUNK, FittedMethod, ProtectBatch, clip_arch_id, in_fixed_chunks
from uge_protect.methods.uge.config import APPLY_FIELDS, AUTO_STUDENTS, UGEArtifact
from uge_protect.methods.uge.generator import build_noise_generator
from uge_protect.methods.uge.key import key_signs, levels_along_key
from uge_protect.methods.uge.texture_key import block_coefficients, texture_levels, texture_phases, texture_tiles
from uge_protect.models.classifiers import set_frozen


def uge_fit_architectures(students: list[str], feature_model: str | dict | None, fd_weight: float,
                          authorized: str | None = None) -> list[str]:
    """What a UGE fit trains δ against: the L_ud students, the feature space's CLIP image
    tower when L_fd is on, and ``authorized`` when given (L_gm fits δ through the authorized
    network: without the key projection). Under the key projection the authorized network
    never sees δ, so it is not among them unless it is a student: its key-less copy is a
    hacker like any other."""
    names = list(students) + ([authorized] if authorized else [])
    if fd_weight > 0 and feature_model is not None:
        names.append(clip_arch_id(feature_model))
    return list(dict.fromkeys(names))


def load_uge_artifact(path: str, required: tuple[str, ...] = APPLY_FIELDS
                      ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """A UGE artifact's config and weights, the config checked against :class:`UGEArtifact`
    (``required`` fields present); a :class:`UserError` for anything unusable, among them
    the integer keys of older versions (too short to stay secret)."""
    def check(config: dict[str, Any]) -> None:
        key = config.get("key_seed")
        if isinstance(key, int) and not isinstance(key, bool):
            raise UserError(f"UGE artifact {path} holds an integer key from an older version: it has fewer than 128 "
                            "bits and its published fingerprint can be brute-forced; refit it with `uge-protect fit "
                            "uge` (it draws a fresh 256-bit key)")
        # artifacts older than these fields made δ from the image alone, and had no gate
        check_config(path, config, UGEArtifact, required=required,
                     legacy={"label_conditioned": False, "confidence_gate": False, "key_scheme": "colour"})

    return load_artifact(path, expected_method="uge", check=check)


class Ungeneralizable(FittedMethod):
    """Apply a fitted UGE generator: δ from each image alone (no label or caption needed)."""

    name = "uge"

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                 fingerprint: str | None = None):
        super().__init__(config, fingerprint)
        self.key_projection = bool(config["key_projection"])
        self.label_conditioned = bool(config.get("label_conditioned", False))
        self.num_classes = int(config["num_classes"])
        self.key = str(config["key_seed"])
        # the artifact's schema already refused a texture key without the projection or the labels
        texture = config.get("key_scheme", "colour") == "texture"
        self.signs = key_signs(self.key) if self.key_projection and not texture else None
        self.tiles = texture_tiles(self.key, self.num_classes) if texture else None
        self.generator = build_noise_generator(1 if self.key_projection else 3, int(config["width"]),
                                               int(config["depth"]), seed=0,
                                               num_classes=self.num_classes if self.label_conditioned else None,
                                               pattern_size=int(config.get("pattern_size", 32)))
        try:
            self.generator.load_state_dict(weights["generator"], strict=True)
        except (KeyError, RuntimeError) as exc:
            raise UserError(f"UGE artifact's generator does not load: {str(exc).splitlines()[0]}") from exc
        self.generator.eval()
        set_frozen(self.generator, True)

    @classmethod
    def from_artifact(cls, path: str, epsilon: float | None = None) -> "Ungeneralizable":
        """Load an artifact made by ``uge-protect fit uge``; its ε is authoritative."""
        config, weights = load_uge_artifact(path)
        check_fitted_epsilon(path, config, epsilon)
        with loading(path, "UGE"):
            return cls(config, weights, fingerprint=artifact_fingerprint(path))

    @property
    def requires_label(self) -> bool:  # type: ignore[override]
        return self.label_conditioned

    def to(self, device: torch.device | str) -> "Ungeneralizable":
        super().to(device)
        self.generator.to(self.device)
        return self

    def fit_architectures(self) -> list[str]:
        """The students and the L_fd feature space (see :func:`uge_fit_architectures`)."""
        c = self._config
        student = str(c.get("student") or "")
        students = list(AUTO_STUDENTS) if student.strip() == "auto" else [x.strip() for x in student.split(",") if x.strip()]
        gm_active = not c.get("key_projection", True) and float(c.get("gm_weight") or 0) > 0
        return uge_fit_architectures(students, c.get("feature_model"), float(c.get("fd_weight") or 0),
                                     c["authorized"] if gm_active else None)

    def config(self) -> dict[str, Any]:
        """Public parameters only: the key and authorized weights appear as fingerprints."""
        keep = ("authorized", "key_projection", "key_scheme", "key_fingerprint", "authorized_init_fingerprint", "fit_size",
                "steps", "gm_weight", "fd_weight", "ud_weight", "misalign", "student", "label_conditioned",
                "confidence_gate")
        return self.public_config(keep, apply_chunk=APPLY_CHUNK)

    @torch.no_grad()
    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        """δ in uint8 levels (int16): the image's class texture at its phase (texture key),
        along the key direction (colour key), both exact after quantization, else ε·t rounded
        to levels."""
        labels: list[int] | None = None
        if self.label_conditioned:
            labels = []
            for lab in batch.labels:
                if lab is None or not 0 <= int(lab) < self.num_classes:
                    raise UserError(f"label {lab!r} is not one of the artifact's {self.num_classes} classes")
                labels.append(int(lab))
        x = batch.images.to(self.device)
        if labels is None:
            t = in_fixed_chunks(lambda xx: self.generator(xx), x)
        else:
            y = torch.tensor(labels, dtype=torch.long, device=self.device)
            t = in_fixed_chunks(lambda xx, yy: self.generator(xx, yy), x, y)
        if self.tiles is not None:
            assert labels is not None
            pixels = batch.pixels.to(self.device)
            return texture_levels(pixels, block_coefficients(t), torch.tensor(labels), self.tiles,
                                  texture_phases(self.key, pixels), self.epsilon)
        if self.signs is not None:
            return levels_along_key(batch.pixels.to(self.device), t, self.signs, self.epsilon)
        q = round(self.epsilon * 255)
        levels = torch.round(t.float() * q).to(torch.int16)
        p = batch.pixels.to(self.device).to(torch.int16)
        return torch.minimum(torch.maximum(levels, -p), 255 - p)
