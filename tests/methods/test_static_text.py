"""The static caption encoder: distilled from MiniLM, batch-independent, carried and checked by an artifact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.models import static_text
from uge_protect.models.static_text import centred_static, distil, from_tensors
from uge_protect.models.text_encoders import MINILM_SHA256, load_text_encoder

CAPTIONS = ["a photo of a circle", "a small red square on a striped background", "a picture of a circle",
            "medium white ring at the top against a checkered black backdrop", ""]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()


@pytest.fixture(scope="module")
def static(minilm):
    return distil(minilm)


def test_each_row_is_the_encoder_s_own_output_for_its_token_alone(minilm, static):
    tok = minilm.tokenizer
    assert static.table16.shape == (tok.get_vocab_size(), 384) and static.table16.dtype == torch.float16
    for word in ("circle", "square", "the", "##ing"):
        t = tok.token_to_id(word)
        ids = torch.tensor([[tok.token_to_id("[CLS]"), t, tok.token_to_id("[SEP]")]])
        want = minilm.embed_ids(ids, torch.ones_like(ids))[0]
        assert torch.allclose(static.table16[t].float(), want, atol=1e-3)
    assert static.identity == {"name": "minilm", "sha256": MINILM_SHA256, "dim": 384, "pooling": "static-mean",
                               "table_sha256": static.sha256, "max_length": 256}


def test_a_caption_is_the_normalised_mean_of_its_token_rows_whatever_it_is_batched_with(static):
    e = static.encode(CAPTIONS)
    assert e.shape == (5, 384) and torch.allclose(e.norm(dim=1), torch.ones(5))
    ids = static.tokenizer.encode(CAPTIONS[1]).ids
    assert torch.allclose(e[1], F.normalize(static.table16[ids].float().mean(0), dim=0), atol=1e-5)
    crowd = [f"a {c} thing number {i}" for i in range(50) for c in ("blue", "green")]
    for i, text in enumerate(CAPTIONS):
        assert torch.equal(static.encode([text])[0], e[i])
        assert torch.equal(static.encode(crowd[:37] + [text] + crowd[37:])[37], e[i])
    # the class word still decides: a caption is nearer its own class prompt than another's
    assert float(e[0] @ e[2]) > float(e[0] @ static.encode(["a photo of a square"])[0])


def test_centring_moves_every_caption_by_the_corpus_mean(static):
    corpus = [f"a photo of a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")]
    centred = centred_static(static, corpus)
    means = centred.token_means(corpus)
    assert means.mean(0).abs().max() < 2e-3  # fp16 rounding of the moved rows
    e = centred.encode(corpus)
    assert float((e @ e.T).masked_fill(torch.eye(9, dtype=torch.bool), 0).max()) < 0.9
    assert float((static.encode(corpus) @ static.encode(corpus).T).min()) > 0.8  # uncentred: all alike


def test_an_artifact_s_table_must_match_its_recorded_hash_and_shape(static):
    tensors, ident = static.tensors(), static.identity
    again = from_tensors(tensors, ident)
    assert torch.equal(again.encode(CAPTIONS), static.encode(CAPTIONS))
    edited = dict(tensors, static_table=tensors["static_table"].clone())
    edited["static_table"][5, 0] += 1
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        from_tensors(edited, ident)
    with pytest.raises(UserError, match="not a static caption encoder"):
        from_tensors({**tensors, "extra": torch.zeros(1, dtype=torch.uint8)}, ident)
    with pytest.raises(UserError, match="recorded dimension"):
        from_tensors(tensors, {**ident, "dim": 12})
    with pytest.raises(UserError, match="max_length"):
        from_tensors(tensors, {**ident, "max_length": 10 ** 9})
    small = static.table16[:100].clone()
    with pytest.raises(UserError, match="only 100 rows"):
        from_tensors(dict(tensors, static_table=small), {**ident, "table_sha256": static_text.table_sha256(small)})
    bad = torch.full((30522, 384), float("nan"), dtype=torch.float16)
    with pytest.raises(UserError, match="non-finite"):
        from_tensors(dict(tensors, static_table=bad), {**ident, "table_sha256": static_text.table_sha256(bad)})
