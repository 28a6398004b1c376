"""ZIP results (an archive of photos sent to BlurIt): each photo and video in the archive is
rewritten as a single one would be, its metadata taken from the entry of the same name in
the input archive; other entries are copied as they are.

Entries are unpacked one at a time into temp files beside ``dest`` (names starting with
``TEMP_PREFIX``, removed at start-up after a crash), so memory stays small whatever the
archive's size. Entry names are only ever used as names inside the new archive, never as
paths on disk.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from blurd import defaults, writer
from blurd.metadata.kinds import Rewrite, rewriter
from blurd.metadata.policy import Carried, MetadataError, Policy

_COPY_CHUNK_BYTES = 1024 * 1024



def carry_zip_metadata(
    source: Path, output: Path, dest: Path, policy: Policy, *, upright: bool
) -> Carried:
    """Write the archive ``dest`` from ``output`` with every photo and video rewritten."""
    try:
        out_zip = zipfile.ZipFile(output)
    except (zipfile.BadZipFile, OSError) as exc:
        raise MetadataError(output, f"not a readable ZIP archive ({exc})") from exc
    notes: list[str] = []
    kept: set[str] = set()
    dropped: set[str] = set()
    with out_zip, _source_zip(source, notes) as src_zip, zipfile.ZipFile(dest, "x") as new_zip:
        for info in out_zip.infolist():
            if info.file_size > defaults.MAX_INPUT_BYTES:
                raise MetadataError(output, f"{info.filename!r} unpacks to {info.file_size} bytes")
            rewrite = rewriter(Path(info.filename).suffix, policy, upright=upright)
            if info.is_dir() or rewrite is None:
                _copy_entry(out_zip, info, new_zip)
                continue
            carried = _rewrite_entry(out_zip, src_zip, info, new_zip, dest, rewrite)
            kept.update(carried.kept)
            dropped.update(carried.dropped)
            if carried.note:
                notes.append(f"{info.filename}: {carried.note}")
    return Carried(tuple(sorted(kept)), tuple(sorted(dropped)), "; ".join(notes) or None)


@contextmanager
def _source_zip(source: Path, notes: list[str]) -> Iterator[zipfile.ZipFile | None]:
    try:
        src_zip = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        notes.append(f"input archive unreadable, nothing of it carried ({exc})")
        yield None
        return
    with src_zip:
        yield src_zip


def _rewrite_entry(
    out_zip: zipfile.ZipFile,
    src_zip: zipfile.ZipFile | None,
    info: zipfile.ZipInfo,
    new_zip: zipfile.ZipFile,
    dest: Path,
    rewrite: Rewrite,
) -> Carried:
    suffix = Path(info.filename).suffix.lower()
    temps = [writer.temp_name(dest, suffix=suffix) for _ in range(3)]
    body, original, rewritten = temps
    try:
        _unpack(out_zip, info, body)
        original.touch(exist_ok=False)  # empty: nothing to carry, unless the input has it
        if src_zip is not None:
            with suppress(KeyError):
                _unpack(src_zip, src_zip.getinfo(info.filename), original, replace=True)
        try:
            carried = rewrite(original, body, rewritten)
        except MetadataError as exc:
            raise MetadataError(dest, f"{info.filename!r} in the archive: {exc.reason}") from exc
        new_zip.write(rewritten, arcname=info.filename, compress_type=info.compress_type)
        return carried
    finally:
        for path in temps:
            path.unlink(missing_ok=True)


def _unpack(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, *, replace: bool = False
) -> None:
    with zf.open(info) as entry, open(path, "wb" if replace else "xb") as out:
        shutil.copyfileobj(entry, out, _COPY_CHUNK_BYTES)


def _copy_entry(out_zip: zipfile.ZipFile, info: zipfile.ZipInfo, new_zip: zipfile.ZipFile) -> None:
    if info.is_dir():
        new_zip.writestr(info, b"")
        return
    with out_zip.open(info) as entry, new_zip.open(info, "w") as out:
        shutil.copyfileobj(entry, out, _COPY_CHUNK_BYTES)
