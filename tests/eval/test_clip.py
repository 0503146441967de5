"""CLIP-from-scratch evaluation: retrieval metrics, a tiny training run, zero-shot."""

from __future__ import annotations

import math

import pytest
import torch

from uge_protect.eval import clip as C
from uge_protect.shards.dataset import InMemoryDataset

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240, 240, 240)}
SHAPES = ["square", "bar"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second intra-op thread only adds synchronisation, which costs a lot
    # when the test machine's cores are busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dataset(n: int, size: int = 16, seed: int = 0, with_labels: bool = True) -> InMemoryDataset:
    """Coloured squares or bars on black; the caption names colour, shape and side."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    captions, labels = [], []
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        shape = SHAPES[(i // len(names)) % 2]
        side = "left" if (i // (2 * len(names))) % 2 == 0 else "right"
        x0 = 1 if side == "left" else size // 2 + 1
        rgb = torch.tensor(COLOURS[colour], dtype=torch.uint8).view(3, 1, 1)
        h = size // 2 - 2 if shape == "square" else size - 2
        images[i, :, 1:1 + h, x0:x0 + size // 2 - 2] = rgb
        images[i] = (images[i].int() + torch.randint(0, 8, (3, size, size), generator=g)).clamp(0, 255).byte()
        captions.append(f"a {colour} {shape} on the {side}")
        labels.append(names.index(colour))
    lab = torch.tensor(labels if with_labels else [-1] * n, dtype=torch.int64)
    return InMemoryDataset(images, lab, captions, [f"k{i}" for i in range(n)], 0)


# ----------------------------------------------------------------------------- metrics


def test_perfect_retrieval():
    emb = torch.eye(6)
    m = C.retrieval_metrics(emb, emb)
    for d in ("i2t", "t2i"):
        assert m[d] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0}


def test_known_ranks_from_score_matrix():
    # Image i's true text is text i; make text j score (n - |shift|) so ranks are known.
    n = 12
    # sim[i, j]: true match of query i gets rank i (0-based): i others score higher.
    sim = torch.zeros(n, n)
    for i in range(n):
        order = [j for j in range(n) if j != i]
        ranked = order[:i] + [i] + order[i:]  # position of i in the ranking is i
        for pos, j in enumerate(ranked):
            sim[i, j] = float(n - pos)
    m = C.retrieval_metrics(sim, torch.eye(n))  # image_emb @ eye = sim
    assert m["i2t"]["R@1"] == pytest.approx(1 / 12)
    assert m["i2t"]["R@5"] == pytest.approx(5 / 12)
    assert m["i2t"]["R@10"] == pytest.approx(10 / 12)
    assert m["i2t"]["median_rank"] == pytest.approx(6.5)  # 1-based ranks 1..12


def test_reversed_pairs_and_odd_median():
    # Texts are the images in reverse order: the true match is never first except the middle.
    n = 5
    img = torch.eye(n)
    txt = torch.eye(n).flip(0)
    # true pair (i, i) scores 1 only when i == n-1-i (i = 2); otherwise it scores 0 while
    # the reversed text scores 1 and the remaining ties at 0 count against the query.
    m = C.retrieval_metrics(img, txt)
    assert m["i2t"]["R@1"] == pytest.approx(1 / 5)
    assert m["i2t"]["median_rank"] == 5.0  # ranks: 5, 5, 1, 5, 5 (ties are pessimistic)
    assert m["t2i"] == m["i2t"]


def test_asymmetric_directions():
    # Image 0 is close to both texts; text 1 is closest to image 0 → t2i for text 1 misses.
    img = torch.tensor([[1.0, 1.0], [0.0, 0.1]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = C.retrieval_metrics(img, txt)
    # i2t: img0 → scores (1, 1): tie → rank 2; img1 → (0, .1): rank 1
    assert m["i2t"]["R@1"] == 0.5 and m["i2t"]["median_rank"] == 1.5
    # t2i: txt0 → (1, 0): rank 1; txt1 → (1, .1): true is img1 → rank 2
    assert m["t2i"]["R@1"] == 0.5


def test_metrics_reject_mismatched_sizes():
    with pytest.raises(ValueError):
        C.retrieval_metrics(torch.zeros(3, 4), torch.zeros(2, 4))


# ----------------------------------------------------------------------------- training


def test_random_crop_keeps_shape_and_content_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    y = C._random_crop(x, 2, g)
    assert y.shape == x.shape
    assert y.min() >= x.min() and y.max() <= x.max()
    assert torch.equal(C._random_crop(x, 0, g), x)


def test_loss_falls_on_memorisable_set():
    ds = _dataset(16)  # 16 distinct captions, one batch
    _, per_epoch, losses = C._train(
        ds, epochs=100, seed=0, model_config=TINY, batch_size=16, lr=3e-3, weight_decay=0.0,
        warmup_frac=0.0, crop_pad=0, device="cpu", eval_pairs=None, progress=False, label="t",
        max_steps=24)
    assert len(losses) == 24 and len(per_epoch) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first == pytest.approx(math.log(16), rel=0.2)  # about chance at initialisation
    assert last < first - 0.3, (first, last)


def test_train_clip_is_deterministic_and_carries_preprocessing():
    ds = _dataset(32)
    a = C.train_clip(ds, epochs=1, batch_size=16, model_config=TINY, seed=3)
    b = C.train_clip(ds, epochs=1, batch_size=16, model_config=TINY, seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert a.input_size == 16 and len(a.image_mean) == 3 and callable(a.tokenizer)


def test_run_clip_eval_returns_documented_keys():
    train = _dataset(32)
    test = _dataset(12, seed=1)
    test.captions[5] = None  # samples without a caption are left out of retrieval
    res = C.run_clip_eval(train, _dataset(32, seed=2), test, epochs=1, batch_size=16, model_config=TINY,
                          class_names=list(COLOURS), progress=False)
    assert set(res) == {"settings", "protected", "clean"}
    assert res["settings"]["n_test_pairs"] == 11 and res["settings"]["epochs"] == 1
    for which in ("protected", "clean"):
        r = res[which]
        assert set(r) == {"i2t", "t2i", "zero_shot_accuracy", "per_epoch", "seconds", "crop_pad"}
        for d in ("i2t", "t2i"):
            assert set(r[d]) == {"R@1", "R@5", "R@10", "median_rank"}
            assert 0.0 <= r[d]["R@1"] <= r[d]["R@5"] <= r[d]["R@10"] <= 1.0
            assert 1.0 <= r[d]["median_rank"] <= 11.0
        assert 0.0 <= r["zero_shot_accuracy"] <= 1.0
        assert len(r["per_epoch"]) == 1
        assert set(r["per_epoch"][0]) == {"epoch", "loss", "i2t_R@10", "t2i_R@10"}


def test_default_config_follows_image_size():
    bundle = C.build_clip(None, image_size=16)
    assert bundle.image_size == 16
    assert C.DEFAULT_MODEL_CONFIG["vision_cfg"]["image_size"] == 32  # default left untouched
    tokens = bundle.tokenizer(["a red square"])
    assert tokens.shape == (1, C.DEFAULT_MODEL_CONFIG["text_cfg"]["context_length"])


def test_config_from_json_file(tmp_path):
    import json

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    bundle = C.build_clip(str(path))
    assert bundle.image_size == 16 and bundle.config == TINY


# ----------------------------------------------------------------------------- zero-shot


class _StubModel:
    """Images embed as their mean colour; class prompts embed as a fixed colour."""

    PROMPTS = {"a photo of a red": [1.0, 0, 0], "a photo of a green": [0, 1.0, 0], "a photo of a blue": [0, 0, 1.0]}

    def encode_text(self, tokens):
        return tokens

    def encode_image(self, x):
        return x.mean(dim=(2, 3))


def _stub_tokenizer(texts):
    return torch.tensor([_StubModel.PROMPTS[t] for t in texts])


def test_zero_shot_on_stub():
    ds = _dataset(12)  # labels: index in COLOURS (red, green, blue, white)
    ds.labels[ds.labels == 3] = -1  # white has no class prompt: ignored
    acc = C.zero_shot_accuracy(_StubModel(), _stub_tokenizer, ds, ["red", "green", "blue"],
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert acc == 1.0
    # swapping two class names makes those classes wrong
    acc = C.zero_shot_accuracy(_StubModel(), _stub_tokenizer, ds, ["green", "red", "blue"],
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert acc == pytest.approx(1 / 3)


def test_zero_shot_without_labels_is_none():
    ds = _dataset(8, with_labels=False)
    assert C.zero_shot_accuracy(_StubModel(), _stub_tokenizer, ds, ["red"]) is None


def test_zero_shot_on_trained_model_uses_its_preprocessing():
    ds = _dataset(16)
    model = C.train_clip(ds, epochs=1, batch_size=16, model_config=TINY)
    acc = C.zero_shot_accuracy(model, model.tokenizer, ds, list(COLOURS))
    assert acc is not None and 0.0 <= acc <= 1.0
