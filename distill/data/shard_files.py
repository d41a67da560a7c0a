"""Where a shard set's files are read from, as ``data.path`` names it:

- a local or mounted folder (or its ``manifest.json``): every access mode;
- an fsspec URL: ``s3://``, ``gs://``, ``az://``, ``hf://datasets/...``, ``https://``, ``file://``
  (fsspec ships with datasets; the object stores need their backend: s3fs, gcsfs, adlfs);
- ``pipe:COMMAND``, WebDataset's form: a shell command that writes one file of the set to its
  standard output, ``{}`` standing for the file's name (``pipe:aws s3 cp s3://bucket/in1k/{} -``).

A URL or a command is read front to back only: ``data.shard_access=stream`` reads the training
split that way, and the validation split is fetched once into a local cache (``DISTILL_CACHE``,
default ``~/.cache/distill``; ``shards/<sha256>.arrow``, checked against the manifest's hash) and
read at random from there. ``file://`` is read as any URL is (through fsspec, front to back).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from distill.errors import DataError

MANIFEST = "manifest.json"
PIPE = "pipe:"
CACHE_ENV = "DISTILL_CACHE"


def is_url(path: object) -> bool:
    text = str(path)
    return "://" in text or text.startswith(PIPE)


@dataclass(frozen=True)
class ShardFiles:
    """The files of one shard set. ``root``: the folder, URL or command template as given (its
    trailing ``manifest.json`` removed); ``local``: the folder, when the files are on this
    machine (or mounted), else None."""

    root: str
    local: Path | None

    def where(self, name: str) -> str:
        """A file of the set as a message names it."""
        if self.root.startswith(PIPE):
            return f"{name} (from `{self.command(name)}`)"
        return f"{self.root.rstrip('/')}/{name}" if self.local is None else str(self.local / name)

    def command(self, name: str) -> str:
        return self.root[len(PIPE) :].replace("{}", shlex.quote(name))

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """File ``name`` of the set opened for reading front to back. A file that is missing or
        cannot be read is a DataError naming it."""
        if self.root.startswith(PIPE):
            with _pipe(self.command(name), self.where(name)) as fh:
                yield fh
            return
        if self.local is not None:
            try:
                fh = open(self.local / name, "rb")  # noqa: SIM115 (closed below)
            except OSError as exc:
                raise DataError(f"cannot read {self.where(name)}: {exc.strerror or exc}") from None
        else:
            fh = _fsspec_open(self.where(name), self._missing(name))
        with fh:
            yield fh

    def _missing(self, name: str) -> str:
        """What to do about file ``name`` of the set not being there."""
        if name == MANIFEST:
            return (
                f"no shard set at {self.root} (no {MANIFEST}): check data.path, or write one with "
                "`python -m distill.shard RECIPE --out DIR` and copy the folder there"
            )
        return (
            f"it is listed in {MANIFEST}: copy it there again from the shard set, or write the set again with "
            "`python -m distill.shard RECIPE --out DIR` and copy the folder there"
        )

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()


def shard_files(path: object) -> ShardFiles:
    """``data.path`` of a shard set as its files (a folder, a URL, a ``pipe:`` command)."""
    text = str(path)
    if text.rstrip("/").endswith(MANIFEST):
        text = text.rstrip("/")[: -len(MANIFEST)].rstrip("/") or "."
    if text.startswith(PIPE) and "{}" not in text:
        raise DataError(
            f"data.path={text}: a pipe: command reads one file of the shard set and names it with "
            "{}, for example pipe:aws s3 cp s3://bucket/shards/{} -"
        )
    if is_url(text):
        return ShardFiles(text, None)
    folder = Path(text).expanduser()
    return ShardFiles(str(folder), folder)


def _fsspec_open(url: str, missing: str) -> IO[bytes]:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:  # ImportError: a known protocol without its backend
        raise DataError(f"cannot read {url}: {exc} (pip install it beside distill)") from None
    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise DataError(f"{url} is missing; {missing}") from None
    except OSError as exc:
        raise DataError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def _pipe(command: str, where: str) -> Iterator[IO[bytes]]:
    """The standard output of ``command``, run through the shell as WebDataset runs ``pipe:``.
    The reader reads to the end, and the command must then exit 0 (a reader that leaves the
    block early without an exception would see it killed by SIGPIPE). A reader stopped early by
    GeneratorExit (a stream cut at the epoch's last batch) stops the command and every process of
    its pipeline (its own session); a reader that fails reports the command's own failure first,
    when it had one (a truncated output is its symptom)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        assert proc.stdout is not None

        def failure(code: int) -> DataError:
            err.seek(0)
            said = err.read().decode(errors="replace").strip()[-500:]
            return DataError(f"cannot read {where}: the command exited with status {code}: {said or '(no message)'}")

        try:
            yield proc.stdout
        except Exception:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = 0
            if code:
                raise failure(code) from None
            raise
        else:
            proc.stdout.close()
            if code := proc.wait():
                raise failure(code)
        finally:  # GeneratorExit lands here too: the reader stopped early
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.stdout.close()
            proc.wait()


class HashingReader:
    """A file read through, hashing what passes (sha256) and counting it; a read that fails
    (the network, a credential, a command) is a DataError naming the file."""

    def __init__(self, fh: IO[bytes], where: str) -> None:
        self.fh, self.where, self.digest, self.size = fh, where, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.fh.read(n)
        except DataError:
            raise
        except Exception as exc:  # OSError, a backend's own (aiohttp's, botocore's) errors
            raise DataError(
                f"reading {self.where} failed after {self.size:,} bytes ({type(exc).__name__}: {exc}); a run "
                "stopped by it resumes from its last checkpoint"
            ) from None
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def __getattr__(self, name: str) -> Any:  # closed, readable, ... for pyarrow's PythonFile
        return getattr(self.fh, name)


# ---------------------------------------------------------------------------------------------
# The local cache of fetched files


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distill").expanduser() / "shards"


def fetch(files: ShardFiles, name: str, sha256: str, size: int) -> Path:
    """File ``name`` of the set in the local cache, copied there once under its hash. Each
    fetch writes a temporary file of its own (``mkstemp``: unique across processes, nodes
    sharing the cache and containers) and renames it into place (atomic: fetches of the same
    file at once all end with the same whole file). A copy whose hash is not the manifest's is a
    DataError and is not kept."""
    path = cache_dir() / f"{sha256}.arrow"
    if path.is_file() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with files.open(name) as src, os.fdopen(fd, "wb") as dst:
            reader = HashingReader(src, files.where(name))
            while chunk := reader.read(1 << 20):
                dst.write(chunk)
        if (digest := reader.digest.hexdigest()) != sha256:
            raise DataError(
                f"{files.where(name)} has sha256 {digest[:16]}..., its manifest says {sha256[:16]}...: "
                "it is corrupt or was replaced; write the shard set again with `python -m distill.shard`"
            )
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
