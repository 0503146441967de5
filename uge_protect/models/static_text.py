"""A static caption encoder distilled from a sentence encoder: one vector per token, averaged.

A transformer caption encoder costs tens of MFLOPs per token, which on a CPU bounds T2UE's
apply speed when every caption is unique. The static encoder keeps the sentence encoder's
vocabulary and tokenizer but replaces the network by a table: row ``t`` is the sentence
encoder's own (pooled) output for the one-token text ``[CLS] t [SEP]``, computed once at fit
time for every token of the vocabulary. A caption's embedding is the L2-normalised mean of the
rows of its tokens (special tokens included, so no caption is empty). The table is stored in
float16 and used as stored, so fit and apply see the same numbers.

The table and the tokenizer travel in the artifact (``text_encoder.safetensors``): applying it
needs neither the sentence encoder's package nor its weights, and reads nothing outside the
artifact. A caption's embedding never depends on the other captions of a call: float16 rows
summed in float64 are exact whatever the order of the sum.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError

POOLING = "static-mean"
DISTIL_CHUNK = 1024          # vocabulary rows per forward pass of the distillation
TABLE = "static_table"
TOKENIZER = "tokenizer.json"
MAX_VOCAB = 1 << 20
MAX_DIM = 4096


def table_sha256(table: torch.Tensor) -> str:
    """SHA-256 of a table's float16 bytes (what an artifact records and checks)."""
    return hashlib.sha256(table.to(torch.float16).contiguous().numpy().tobytes()).hexdigest()


class StaticEncoder:
    """Token table plus tokenizer: ``encode(texts)`` → (N, dim) unit rows, float32."""

    def __init__(self, table: torch.Tensor, tokenizer_json: bytes, *, name: str, source_sha256: str,
                 max_length: int = 256, where: str = "static caption encoder"):
        if table.ndim != 2 or not 2 <= table.shape[0] <= MAX_VOCAB or not 1 <= table.shape[1] <= MAX_DIM:
            raise UserError(f"{where}: the token table has an unusable shape {tuple(table.shape)}")
        if table.dtype != torch.float16:
            raise UserError(f"{where}: the token table must be float16, got {table.dtype}")
        if not bool(torch.isfinite(table).all()):
            raise UserError(f"{where}: the token table holds non-finite values")
        try:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - any malformed tokenizer is one user error
            raise UserError(f"{where}: cannot read its tokenizer: {str(exc).splitlines()[0]}") from None
        if self.tokenizer.get_vocab_size() > table.shape[0]:
            raise UserError(f"{where}: its tokenizer has {self.tokenizer.get_vocab_size()} tokens but the "
                            f"table only {table.shape[0]} rows")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.table16 = table.contiguous()
        self._table = table.double()
        self.tokenizer_json = tokenizer_json
        self.name, self.source_sha256, self.max_length = name, source_sha256, max_length
        self.dim = int(table.shape[1])
        self.sha256 = table_sha256(table)
        self.device = torch.device("cpu")

    @property
    def identity(self) -> dict[str, Any]:
        """What an artifact records: the source encoder (name, weights sha256), the table's sha256."""
        return {"name": self.name, "sha256": self.source_sha256, "dim": self.dim, "pooling": POOLING,
                "table_sha256": self.sha256, "max_length": self.max_length}

    def to(self, device: torch.device | str) -> "StaticEncoder":
        """A no-op: a gather and a sum per caption cost less on the CPU than a copy to a device."""
        return self

    def token_means(self, texts: list[str]) -> torch.Tensor:
        """Each text's mean token row (N, dim), float64, before normalisation."""
        ids = [e.ids or [0] for e in self.tokenizer.encode_batch([str(t) for t in texts])]
        if not ids:
            return torch.empty((0, self.dim), dtype=torch.float64)
        lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(ids)), lengths)
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
        # float16 rows summed in float64 are exact, so no summation order (batching) changes a sum
        sums = torch.zeros((len(ids), self.dim), dtype=torch.float64).index_add_(0, rows, self._table[flat])
        return sums / lengths[:, None]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (N, dim), float32 on the CPU, each computed from its own caption alone."""
        return F.normalize(self.token_means(texts), dim=-1).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The table and the tokenizer's bytes, as an artifact stores them."""
        return {TABLE: self.table16.clone(),
                TOKENIZER: torch.frombuffer(bytearray(self.tokenizer_json), dtype=torch.uint8)}


def from_tensors(tensors: Mapping[str, torch.Tensor], identity: Mapping[str, Any], *,
                 where: str = "T2UE artifact's caption encoder") -> StaticEncoder:
    """The static encoder an artifact carries; its table must match the recorded sha256."""
    if set(tensors) != {TABLE, TOKENIZER} or tensors[TOKENIZER].dtype != torch.uint8 or tensors[TOKENIZER].ndim != 1:
        raise UserError(f"{where} is not a static caption encoder (a token table and a tokenizer)")
    table = tensors[TABLE]
    expected = str(identity.get("table_sha256", ""))
    if table.dtype != torch.float16 or table_sha256(table) != expected:
        raise UserError(f"{where}: the token table does not match its recorded sha256: the artifact was edited")
    max_length = identity.get("max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= 4096:
        raise UserError(f"{where}: its recorded max_length must be an integer in [1, 4096]")
    encoder = StaticEncoder(table, tensors[TOKENIZER].numpy().tobytes(), name=str(identity.get("name", "")),
                            source_sha256=str(identity.get("sha256", "")), max_length=max_length, where=where)
    if encoder.dim != int(identity.get("dim", -1)):
        raise UserError(f"{where}: the token table does not have the recorded dimension")
    return encoder


_TABLES: dict[str, torch.Tensor] = {}  # per process, by source weights: a fit distils once


def _distil_table(sentence: Any) -> torch.Tensor:
    tok = sentence.tokenizer
    vocab = tok.get_vocab_size()
    start, end = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if start is None or end is None:  # a tokenizer without BERT's specials: use its own post-processor's
        probe = tok.encode("a").ids
        start, end = probe[0], probe[-1]
    rows = []
    for lo in range(0, vocab, DISTIL_CHUNK):
        ids = torch.arange(lo, lo + DISTIL_CHUNK).clamp_max(vocab - 1)  # fixed shapes: the last chunk repeats
        seq = torch.stack([torch.full_like(ids, start), ids, torch.full_like(ids, end)], 1)
        rows.append(sentence.embed_ids(seq, torch.ones_like(seq))[: min(DISTIL_CHUNK, vocab - lo)])
    return torch.cat(rows).to(torch.float16)


def distil(sentence: Any) -> StaticEncoder:
    """The static encoder of ``sentence`` (a :class:`text_encoders.SentenceEncoder`): its
    pooled output for every single token, once per vocabulary (its cost: docs/performance.md).
    The result is cached per process by the encoder's weights sha256."""
    key = f"{sentence.sha256}:{sentence.pooling}:{sentence.tokenizer.get_vocab_size()}"
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = _distil_table(sentence)
    table = _TABLES[key]
    return StaticEncoder(table, sentence.tokenizer_json, name=sentence.name, source_sha256=sentence.sha256,
                         max_length=sentence.max_length)


def centred_static(encoder: StaticEncoder, captions: list[str]) -> StaticEncoder:
    """``encoder`` with its rows moved by the mean (unnormalised) token average of ``captions``.

    Every caption's token average moves by the same vector, so captions are centred on the
    corpus: what they share (``a photo of``) no longer dominates the embedding, and what
    tells them apart does; seen or unseen, every caption moves the same way (up to float16 rounding).
    """
    centre = encoder.token_means(list(dict.fromkeys(map(str, captions)))).mean(0)
    return StaticEncoder((encoder._table - centre).to(torch.float16), encoder.tokenizer_json, name=encoder.name,
                         source_sha256=encoder.source_sha256, max_length=encoder.max_length)
