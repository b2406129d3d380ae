"""Where a runtime load's steer file comes from, read in the API front end before the registry's lock is taken:
a path under one of the operator's load folders (`--steer-load-dir`), opened without blocking, only if it is a
regular file, read with a hard byte bound; or the file itself, uploaded as multipart/form-data and refused as
soon as it passes the bound. Every refusal quotes nothing of the server's files: a path that cannot be loaded
gets one message whether or not it exists, a malformed file the check it failed."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from vllm_steer.steer.file import SteerFile, SteerFileError

# Bytes of multipart framing an upload may carry beside the file itself (boundaries, part headers, fields).
FORM_OVERHEAD = 64 * 1024
# How long reading a path may take (a file on a hung network share must not hold the request forever).
READ_TIMEOUT_S = 30.0
CHUNK = 1 << 20


class LoadRefused(ValueError):
    """A runtime load refused before any worker saw it; `status`: the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoadSource:
    """A runtime load as the client asked for it: the steer's name and bound, its file's bytes, and the path
    they were read from (None: uploaded)."""

    name: str
    data: bytes
    path: str | None = None
    max_abs_value: float | None = None

    @property
    def origin(self) -> str:
        """Where the bytes came from, for the operator's log."""
        return self.path or f"an upload of {len(self.data):,} bytes"


def path_refusal(path: str, roots: tuple[str, ...]) -> str:
    """The one answer to a path that cannot be loaded, whatever the reason."""
    if not roots:
        return ("path loads are off on this server: it has no steer load folders (vllm-steer serve "
                "--steer-load-dir DIR). Upload the file instead: POST /v1/load_steer as multipart/form-data with the "
                "fields name and file.")
    return (f"{path!r} is not a steer file this server may load: path loads read regular files under the server's "
            "steer load folders only (--steer-load-dir). Upload the file instead: POST /v1/load_steer as "
            "multipart/form-data with the fields name and file.")


def read_under_roots(path: str, roots: tuple[str, ...], limit: int) -> bytes:
    """The bytes of the regular file `path` names, if it lies under one of `roots` once symlinks and `..` are
    resolved, at most `limit` of them. LoadRefused otherwise, with one message for every reason a path fails
    (outside the roots, missing, not a regular file, unreadable) and no size of the file's."""
    refused = LoadRefused(path_refusal(path, roots))
    if not roots or not path:
        raise refused
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise refused
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; O_NOFOLLOW: the last component, resolved above,
        # cannot have been swapped for a symlink since.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise refused from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused
        chunks, total = [], 0
        while chunk := os.read(fd, min(CHUNK, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise LoadRefused(f"the steer file is larger than the {limit / 2**20:g} MiB a runtime load accepts "
                                  "(--max-load-size): its bytes are sent to every worker", 413)
        return b"".join(chunks)
    except OSError:
        raise refused from None
    finally:
        os.close(fd)


async def read_path(path: str, roots: tuple[str, ...], limit: int) -> bytes:
    """`read_under_roots` in a thread, bounded in time."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(read_under_roots, path, roots, limit), READ_TIMEOUT_S)
    except TimeoutError:
        raise LoadRefused(f"reading {path!r} took longer than {READ_TIMEOUT_S:g} s; nothing was loaded") from None


async def read_upload(request: Request, limit: int) -> LoadSource:
    """The steer file a multipart/form-data request carries (fields `name`, `file`, optional `max_abs_value`),
    refused (413) as soon as the body passes `limit` bytes of file plus the form's framing."""
    cap = limit + FORM_OVERHEAD
    too_big = LoadRefused(f"the upload is larger than the {limit / 2**20:g} MiB a runtime load accepts "
                          "(--max-load-size): its bytes are sent to every worker", 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise too_big

    async def bounded() -> AsyncIterator[bytes]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise too_big
            yield chunk

    try:
        form = await MultiPartParser(request.headers, bounded(), max_files=1, max_fields=2).parse()
    except LoadRefused:
        raise
    except Exception as e:  # a malformed form: python-multipart and starlette raise their own errors
        raise LoadRefused(f"not a multipart/form-data upload with the fields name and file ({type(e).__name__})") \
            from None
    try:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or upload is None or isinstance(upload, str):
            raise LoadRefused("an upload needs the form fields name (text) and file (the steer file)")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise too_big
        bound = form.get("max_abs_value")
        try:
            max_abs_value = None if bound in (None, "") else float(bound)
        except (TypeError, ValueError):
            raise LoadRefused(f"max_abs_value must be a number, got {bound!r}") from None
        return LoadSource(name, data, None, max_abs_value)
    finally:
        await form.close()


def parse_steer(source: LoadSource) -> SteerFile:
    """The steer in `source`'s bytes (format, shapes, NaN: checked here, once, before any worker sees them);
    LoadRefused naming only the check a malformed file failed."""
    try:
        return SteerFile.from_bytes(source.data, where=source.origin)
    except SteerFileError as e:
        raise LoadRefused(f"not a valid steer file: {e.check}") from e
