"""Tiny fitted methods, made once per test session and shared by the method tests and the
method contract (``test_contract.py``).

Each fit uses the data and tiny configuration of its method's test module, so a method test
and the contract check the same artifact, and a suite run pays for each fit once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.methods import test_em, test_em_clip, test_t2ue, test_uge
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.em.clip import EMClipConfig, fit_em_clip
from uge_protect.methods.em.config import EMConfig
from uge_protect.methods.em.fit import fit_em
from uge_protect.methods.t2ue.config import T2UEConfig
from uge_protect.methods.t2ue.fit import fit_t2ue
from uge_protect.methods.uge.fit import fit_uge

Weights = dict[str, dict[str, torch.Tensor]]

#: T2UE's default objective (class-wise EM noise amortised into a caption-conditioned
#: generator, MiniLM captions) cut to seconds: one EM round, five regression steps.
T2UE_EM_TINY = dict(steps=5, em_rounds=1, noise_size=16, width=2, z_dim=4, device="cpu")


@dataclass
class TinyFit:
    """A fitted artifact on disk with the data it was fitted on and what the fit returned."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    path: Path
    config: dict[str, Any]
    weights: Weights


def _labelled_captions(n: int) -> tuple[torch.Tensor, list[str]]:
    """Four classes and captions that name them (``test_t2ue``'s captions)."""
    return torch.arange(n) % 4, [f"a {test_t2ue.COLOURS[i % 4]} thing number {i}" for i in range(n)]


class TinyFits:
    """Lazily fitted tiny artifacts, each fitted and saved on its first use only."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._factory = tmp_path_factory
        self._fits: dict[str, TinyFit] = {}

    def _get(self, name: str, data: Callable[[], tuple[torch.Tensor, torch.Tensor, list[str]]],
             fit: Callable[[torch.Tensor, torch.Tensor, list[str]], tuple[dict[str, Any], Weights]]) -> TinyFit:
        if name not in self._fits:
            images, labels, captions = data()
            config, weights = fit(images, labels, captions)
            path = save_artifact(self._factory.mktemp(name), config, weights)
            self._fits[name] = TinyFit(images, labels, captions, Path(path), config, weights)
        return self._fits[name]

    def em(self, mode: str) -> TinyFit:
        """EM in ``sample`` or ``class`` mode: ``test_em.TINY`` on ``test_em._data()`` (2 classes)."""
        def data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            images, labels = test_em._data()
            return images, labels, _labelled_captions(len(images))[1]

        return self._get(f"em_{mode}", data,
                         lambda x, y, _: fit_em(x, y, EMConfig(mode=mode, **test_em.TINY)))

    def em_clip(self) -> TinyFit:
        """EM's CLIP mode: ``test_em_clip.TINY`` on ``test_em_clip._data()``."""
        def data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            images, captions = test_em_clip._data()
            return images, torch.arange(len(images)) % 4, captions

        return self._get("em_clip", data, lambda x, _, c: fit_em_clip(x, c, EMClipConfig(**test_em_clip.TINY)))

    def t2ue_infonce(self, backbone: str) -> TinyFit:
        """T2UE's paper objective with the ``ssa`` or ``unet`` generator: ``test_t2ue._tiny``."""
        def data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            images, captions = test_t2ue._data()
            return images, torch.arange(len(images)) % 4, captions

        return self._get(f"t2ue_{backbone}", data,
                         lambda x, _, c: fit_t2ue(x, c, test_t2ue._tiny(backbone=backbone)))

    def t2ue_em(self, encoding: str) -> TinyFit:
        """T2UE's default objective with MiniLM captions, ``static`` (the default) or ``contextual``."""
        def data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            images, _ = test_t2ue._data(n=16)
            return images, *_labelled_captions(len(images))

        return self._get(f"t2ue_em_{encoding}", data, lambda x, y, c: fit_t2ue(
            x, c, T2UEConfig(text_encoding=encoding, **T2UE_EM_TINY), labels=y))

    def uge(self) -> TinyFit:
        """UGE with the key projection: ``test_uge._tiny()`` on 48 stripe images (2 classes)."""
        def data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            images, labels = test_uge.stripes(48)
            return images, labels, _labelled_captions(len(images))[1]

        return self._get("uge", data, lambda x, y, _: fit_uge(x, y, test_uge._tiny()))


@pytest.fixture(scope="session")
def tiny_fits(tmp_path_factory: pytest.TempPathFactory) -> TinyFits:
    """The session's tiny fits (see :class:`TinyFits`)."""
    return TinyFits(tmp_path_factory)
