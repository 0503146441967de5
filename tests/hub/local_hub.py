"""A local HTTP stand-in for the Hugging Face Hub, enough for `huggingface_hub.HfApi` to create a
dataset repository and branches, list a tree and make commits with regular and LFS files (the
legacy LFS "basic" transfer; Xet is turned off by the tests). It binds 127.0.0.1 only."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

from uge_protect.hub.staging import git_blob_sha1

LFS_SUFFIXES = (".tar", ".parquet", ".png")


class LocalHub:
    """State: repos[repo_id][branch] = {path: (bytes, is_lfs)}; ``fail_commit_at`` makes that
    commit call and every later one answer 500 without committing, until it is set to None;
    ``status_for_create`` answers repo creation with it."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, tuple[bytes, bool]]]] = {}
        self.private: dict[str, bool | None] = {}
        self.lfs: dict[str, bytes] = {}
        self.lfs_uploads: list[str] = []
        self.commit_calls = 0
        self.commits: list[list[str]] = []
        self.fail_commit_at: int | None = None
        self.status_for_create: int | None = None
        self.tokens: list[str] = []
        self.validated_cards = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body=None, headers: dict | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                url = urlparse(self.path)
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)/?", url.path)
                if not m:
                    return self._send(404, {"error": "not found"})
                repo, rev = m.group(1), unquote(m.group(2))
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if rev not in hub.repos[repo]:
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                entries = []
                for path, (data, is_lfs) in sorted(hub.repos[repo][rev].items()):
                    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
                    if is_lfs:
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                    entries.append(entry)
                return self._send(200, entries)

            def do_PUT(self):
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                data = self._body()
                if not m or hashlib.sha256(data).hexdigest() != m.group(1):
                    return self._send(400, {"error": "bad upload"})
                hub.lfs[m.group(1)] = data
                hub.lfs_uploads.append(m.group(1))
                return self._send(200, {})

            def do_POST(self):
                hub.tokens.append(self.headers.get("authorization", ""))
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/validate-yaml":  # the Hub checks a README's metadata before a commit
                    payload = json.loads(body)
                    text = payload["content"]
                    errors = []
                    try:
                        meta = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else None
                        for config in (meta or {}).get("configs", []):
                            if not config.get("config_name") or not config.get("data_files"):
                                errors.append({"message": f"bad config {config}"})
                    except yaml.YAMLError as exc:
                        errors.append({"message": str(exc)})
                    if payload.get("repoType") != "dataset" or meta is None:
                        errors.append({"message": "not a dataset card"})
                    hub.validated_cards += 1
                    return self._send(400 if errors else 200, {"errors": errors, "warnings": []})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    if hub.status_for_create:
                        return self._send(hub.status_for_create, {"error": "You don't have the rights"})
                    repo = f"{payload['organization']}/{payload['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this dataset repo",
                                                "url": f"{hub.endpoint}/datasets/{repo}"})
                    hub.repos[repo] = {"main": {".gitattributes": (b"*.tar filter=lfs\n", False)}}
                    hub.private[repo] = {"private": True, "public": False}.get(payload.get("visibility"))
                    return self._send(200, {"url": f"{hub.endpoint}/datasets/{repo}"})
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/branch/([^/]+)", path)
                if m:
                    repo, branch = m.group(1), unquote(m.group(2))
                    if branch in hub.repos[repo]:
                        return self._send(409, {"error": "Reference already exists"})
                    hub.repos[repo][branch] = dict(hub.repos[repo]["main"])
                    return self._send(200, {})
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)
                if m:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                         "shouldIgnore": False} for f in files]})
                m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
                if m:
                    objects = []
                    for obj in json.loads(body)["objects"]:
                        entry = {"oid": obj["oid"], "size": obj["size"]}
                        if obj["oid"] not in hub.lfs:  # already stored: no action, nothing to send
                            entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"}}
                        objects.append(entry)
                    return self._send(200, {"transfer": "basic", "objects": objects})
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)
                if m:
                    hub.commit_calls += 1
                    if hub.fail_commit_at is not None and hub.commit_calls >= hub.fail_commit_at:
                        return self._send(500, {"error": "Internal Error - We're working hard to fix this"})
                    repo, rev = m.group(1), unquote(m.group(2))
                    tree = hub.repos[repo][rev]
                    paths = []
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        value = item["value"]
                        if item["key"] == "file":
                            tree[value["path"]] = (base64.b64decode(value["content"]), False)
                        elif item["key"] == "lfsFile":
                            if value["oid"] not in hub.lfs:
                                return self._send(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                            tree[value["path"]] = (hub.lfs[value["oid"]], True)
                        else:
                            continue
                        paths.append(value["path"])
                    hub.commits.append(paths)
                    oid = hashlib.sha1(repr(hub.commits).encode()).hexdigest()
                    return self._send(200, {"commitUrl": f"{hub.endpoint}/datasets/{repo}/commit/{oid}",
                                            "commitOid": oid})
                return self._send(404, {"error": f"no route {path}"})

        return Handler
