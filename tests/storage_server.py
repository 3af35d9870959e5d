"""A Google Cloud Storage server on 127.0.0.1 for tests: the PyPI `gcp-storage-emulator`, in
memory, on a free port, started and stopped by a fixture.

Every library the project uses is pointed at it through the environment: gcsfs (behind
etils.epath and so behind every path in vit_jax.storage) reads `STORAGE_EMULATOR_HOST`;
tensorstore (orbax's array storage) reads `TENSORSTORE_GCS_HTTP_URL` and, with
`GOOGLE_AUTH_TOKEN_FOR_TESTING`, skips real credentials. Subprocesses get the same
variables through `StorageServer.env`. Nothing leaves localhost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from helpers import free_port


class StorageServer:
    """A running emulator: its URL, the environment that points libraries at it, and a
    fresh bucket per test."""

    def __init__(self, port: int, process: subprocess.Popen):
        self.port = port
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "EPATH_USE_TF": "false",
        }

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}

    def new_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (a unique name unless given; an existing one is kept)."""
        name = name or f"bucket-{uuid.uuid4().hex[:12]}"
        try:
            self._call("POST", "/storage/v1/b?project=test", {"name": name})
        except urllib.error.HTTPError as error:
            if error.code != 409:  # 409: it exists already
                raise
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object's name in a bucket (under `prefix`), read from the server itself."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            listing = self._call("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}")
            names += [item["name"] for item in listing.get("items", [])]
            token = listing.get("nextPageToken")
            if not token:
                return sorted(names)


# Real GCS names an object's generation in the `x-goog-generation` header of every media
# download, and tensorstore's OCDBT driver (orbax's checkpoint format) relies on it for its
# conditional writes; the emulator omits it, so the launcher adds it to its download handler.
LAUNCHER = """
import sys
from gcp_storage_emulator.handlers import objects

original = objects.download

def download(request, response, storage, *args, **kwargs):
    try:
        found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = found["generation"]
        response["x-goog-metageneration"] = found["metageneration"]
    except Exception:
        pass  # a missing object: the handler answers 404
    return original(request, response, storage, *args, **kwargs)

objects.download = download
from gcp_storage_emulator.__main__ import main

main(sys.argv[1:])
"""


def start_server() -> StorageServer:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "start", f"--port={port}", "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = StorageServer(port, process)
    deadline = time.monotonic() + 30
    while True:
        try:
            server._call("GET", "/storage/v1/b?project=test")
            return server
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the storage emulator did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def storage_server():
    """One emulator per test process, with this process's environment pointed at it."""
    server = start_server()
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture
def bucket(storage_server) -> str:
    """A new, empty bucket's name on the session's server."""
    return storage_server.new_bucket()


@pytest.fixture
def readme_bucket(storage_server) -> str:
    """The bucket the README's commands name (`gs://bucket/...`), on the session's server."""
    return storage_server.new_bucket("bucket")
