"""The jobs table, its states and the only transitions allowed between them (DESIGN.md §2)."""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

SCHEMA_VERSION = 3  # the newest migration in blurd.migrations


class JobState(enum.StrEnum):
    QUEUED = "queued"
    UPLOADING = "uploading"
    PROCESSING = "processing"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"


S = JobState
TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (S.QUEUED, S.UPLOADING),
        (S.QUEUED, S.DONE),  # identical content already anonymized: result reused
        (S.QUEUED, S.FAILED),  # rejected locally, before any upload
        (S.UPLOADING, S.PROCESSING),
        (S.UPLOADING, S.QUEUED),  # transient error, or recovery at start-up
        (S.UPLOADING, S.FAILED),
        (S.PROCESSING, S.DOWNLOADING),
        (S.PROCESSING, S.QUEUED),  # the engine lost the job
        (S.PROCESSING, S.FAILED),
        (S.DOWNLOADING, S.DONE),
        (S.DOWNLOADING, S.QUEUED),  # the result is gone
        (S.DOWNLOADING, S.FAILED),
        (S.FAILED, S.QUEUED),  # `blurd retry`
    }
)

ACTIVE_STATES = (S.QUEUED, S.UPLOADING, S.PROCESSING, S.DOWNLOADING)
IN_FLIGHT_STATES = (S.UPLOADING, S.PROCESSING, S.DOWNLOADING)


def allowed(old: JobState, new: JobState) -> bool:
    return (old, new) in TRANSITIONS


metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("watch", String(1024), nullable=False),
    Column("rel_path", String(4096), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("sha256", String(64)),
    Column("fingerprint", String(64)),
    Column("state", String(16), nullable=False),
    Column("remote_id", String(512)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("requeues", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False, default=0.0),
    Column("error", Text),
    Column("progress", String(128)),
    Column("result_media_name", String(512)),
    Column("result_detections_name", String(512)),
    Column("output_media", String(4096)),
    Column("output_detections", String(4096)),
    Column("output_sha256", String(64)),
    Column("bytes_up", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Which daemon holds the job, and until when (DESIGN.md: scale-out). A queued job belongs
    # to nobody unless a node has claimed it for a step; a job at the engine belongs to the node
    # that uploaded it for as long as that node renews the lease.
    Column("node", String(255)),
    Column("lease_until", Float),
    # The file's identity (st_dev, st_ino, st_ctime_ns) when it was hashed: a later look can
    # tell the same file unchanged from one replaced in place. Signed 64-bit (see file_identity).
    Column("dev", BigInteger),
    Column("ino", BigInteger),
    Column("ctime_ns", BigInteger),
    # Submits of this job that may have created a job at the API without blurd learning its id
    # (each a possible double charge): bounded, and never reset.
    Column("maybe_sent", Integer),
    UniqueConstraint("watch", "rel_path", "size", "mtime_ns", name="uq_jobs_version"),
    Index("ix_jobs_state_due", "state", "next_attempt_at"),
    Index("ix_jobs_content", "sha256", "fingerprint", "state"),
    Index("ix_jobs_node", "node", "state"),
    # Retention walks finished jobs from the oldest update on (Store.prune).
    Index("ix_jobs_retention", "state", "updated_at"),
    # The two claim queries (DESIGN.md: scale-out) walk these in due order and stop at the
    # first free row, however long the queue: queued jobs waiting to be hashed, and hashed
    # ones waiting for an upload. Partial, so the rest of the table is not in them.
    *(
        Index(name, "state", "next_attempt_at", "id", sqlite_where=where, postgresql_where=where)
        for name, where in (
            ("ix_jobs_claim_hash", text("state = 'queued' AND sha256 IS NULL")),
            ("ix_jobs_claim_upload", text("state = 'queued' AND sha256 IS NOT NULL")),
        )
    ),
)

daemon_state = Table(
    "daemon_state",
    metadata,
    Column("node", String(255), primary_key=True),  # host:pid of a running daemon
    Column("data", Text, nullable=False),  # JSON: engine, why, auth, pauses, limitations
    Column("updated_at", Float, nullable=False),
)

schema_info = Table(
    "blurd_schema",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)


def file_identity(st: os.stat_result) -> tuple[int, int, int]:
    """(dev, ino, ctime_ns) of a file as the jobs table stores it: each folded into a signed
    64-bit integer, since device and inode numbers are unsigned and may use the top bit."""
    return int64(st.st_dev), int64(st.st_ino), int64(st.st_ctime_ns)


def int64(value: int) -> int:
    """``value`` modulo 2**64, as a signed 64-bit integer (BigInteger's range)."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class Job:
    """One row of the jobs table, detached from any session."""

    id: int
    watch: str
    rel_path: str
    size: int
    mtime_ns: int
    sha256: str | None
    fingerprint: str | None
    state: JobState
    remote_id: str | None
    attempts: int
    requeues: int
    next_attempt_at: float
    error: str | None
    progress: str | None
    result_media_name: str | None
    result_detections_name: str | None
    output_media: str | None
    output_detections: str | None
    output_sha256: str | None
    bytes_up: int
    created_at: float
    updated_at: float
    node: str | None = None
    lease_until: float | None = None
    dev: int | None = None
    ino: int | None = None
    ctime_ns: int | None = None
    maybe_sent: int | None = None

    @classmethod
    def from_row(cls, row: object) -> Job:
        data = dict(row._mapping)  # type: ignore[attr-defined]
        data["state"] = JobState(data["state"])
        return cls(**data)

    @classmethod
    def from_values(cls, names: Sequence[str], values: Sequence[Any]) -> Job:
        """A job from a row given as column names and values (as a DBAPI cursor has them)."""
        data = dict(zip(names, values, strict=True))
        data["state"] = JobState(data["state"])
        return cls(**data)
