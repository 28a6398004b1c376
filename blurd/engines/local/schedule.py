"""Which video frames get a detection, and which boxes every frame hides.

Detection runs on every ``every``-th frame and on the last frame, in a background thread that
works up to two detections ahead of the frame being written, so the model and the encoder use
the cores at the same time (onnxruntime and FFmpeg release the GIL).

What a frame hides:
- a detected frame: its own detections, plus the boxes of the previous detection that found no
  counterpart in it (a face the model missed once stays hidden); such a box also stays in the
  "before" side of the next gap, so it is spanned to the face's next detection;
- a frame in between: ``carried(before, after)``, the boxes of the detections on both sides,
  with one box spanning each pair that is probably the same face, so a face moving between the
  two detections stays covered. Pairs are first the boxes less than 1.5 face sizes apart;
  then boxes left alone on both sides are paired nearest first up to 5 face sizes apart (a
  40 px face crossing a 720p frame in 3 s moves about 2.1 sizes in 6 frames).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from blurd.engines.local.frames import Hit

SAME_FACE_DISTANCE = 1.5  # centre distance, in face sizes, under which two boxes are one face
FAST_FACE_DISTANCE = 5.0  # the same for boxes that found no closer partner on either side
LOOKAHEAD_DETECTIONS = 2  # detections started before a frame is written


class Indexed(Protocol):
    @property
    def index(self) -> int: ...


T = TypeVar("T", bound=Indexed)


@dataclass
class _Slot(Generic[T]):
    item: T
    future: Future[list[Hit]] | None


class DetectionSchedule(Generic[T]):
    """Feeds frames to ``emit(frame, hits)`` in order, detecting with ``find`` on a thread."""

    def __init__(
        self,
        find: Callable[[T], list[Hit]],
        emit: Callable[[T, list[Hit]], None],
        *,
        every: int,
    ) -> None:
        self.find = find
        self.emit = emit
        self.every = max(1, every)
        self._before: list[Hit] = []

    def run(self, frames: Iterable[T]) -> int:
        """Process every frame; returns how many there were."""
        count = 0
        window: deque[_Slot[T]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blurd-detect") as pool:
            for item in frames:
                count += 1
                detect = item.index % self.every == 0
                window.append(_Slot(item, pool.submit(self.find, item) if detect else None))
                self._drain(window, keep=LOOKAHEAD_DETECTIONS)
            if window and window[-1].future is None:
                window[-1].future = pool.submit(self.find, window[-1].item)
            self._drain(window, keep=0)
        return count

    def _drain(self, window: deque[_Slot[T]], *, keep: int) -> None:
        """Write the oldest frames while ``keep`` detections are started after each."""
        while window:
            ahead = [slot for slot in list(window)[1:] if slot.future is not None]
            if len(ahead) < max(keep, 0 if window[0].future is not None else 1):
                return
            slot = window.popleft()
            if slot.future is not None:
                after = slot.future.result()
                # A face the detector missed here keeps its last box on this frame and through
                # the next gap, where it is spanned to its next detection; no further.
                missed = unmatched([a for a in self._before if not a.held], after)
                self.emit(slot.item, after + missed)
                self._before = after + missed
            else:
                upcoming = ahead[0].future
                assert upcoming is not None
                self.emit(slot.item, carried(self._before, upcoming.result()))


def carried(before: list[Hit], after: list[Hit]) -> list[Hit]:
    """Boxes for a frame between two detected frames with ``before`` and ``after`` hits.

    A pair of boxes, one on each side, that are probably the same face becomes one box
    spanning both; every other box is kept as it is. All are marked held.
    """
    out: list[Hit] = []
    matched_after: set[int] = set()
    alone_before: list[Hit] = []
    for a in before:
        pairs = [(j, b) for j, b in enumerate(after) if same_face(a, b)]
        if not pairs:
            alone_before.append(a)
        for j, b in pairs:
            matched_after.add(j)
            out.append(_spanning(a, b))
    alone_after = [b for j, b in enumerate(after) if j not in matched_after]
    partners = _nearest_pairs(alone_before, alone_after, FAST_FACE_DISTANCE)
    for i, a in enumerate(alone_before):
        partner = partners.get(i)
        out.append(a.as_held() if partner is None else _spanning(a, alone_after[partner]))
    taken = set(partners.values())
    out.extend(b.as_held() for j, b in enumerate(alone_after) if j not in taken)
    return out


def _spanning(a: Hit, b: Hit) -> Hit:
    return Hit(
        a.kind,
        min(a.x1, b.x1),
        min(a.y1, b.y1),
        max(a.x2, b.x2),
        max(a.y2, b.y2),
        min(a.score, b.score),
        held=True,
    )


def _nearest_pairs(before: list[Hit], after: list[Hit], reach: float) -> dict[int, int]:
    """Index pairs (before, after) within ``reach``, taken closest first, each box once."""
    candidates = sorted(
        (_distance(a, b), i, j)
        for i, a in enumerate(before)
        for j, b in enumerate(after)
        if same_face(a, b, reach=reach)
    )
    partner: dict[int, int] = {}
    for _, i, j in candidates:
        if i not in partner and j not in partner.values():
            partner[i] = j
    return partner


def unmatched(before: list[Hit], after: list[Hit]) -> list[Hit]:
    """The ``before`` boxes with no counterpart in ``after``, marked held."""
    return [a.as_held() for a in before if not _any_same(a, after)]


def _any_same(a: Hit, others: list[Hit]) -> bool:
    return any(same_face(a, b) for b in others)


def same_face(a: Hit, b: Hit, *, reach: float = SAME_FACE_DISTANCE) -> bool:
    """Two boxes of one class whose centres are closer than ``reach`` face sizes."""
    if a.kind != b.kind:
        return False
    size = max(a.x2 - a.x1, a.y2 - a.y1, b.x2 - b.x1, b.y2 - b.y1)
    return _distance(a, b) <= reach * size


def _distance(a: Hit, b: Hit) -> float:
    return math.hypot((a.x1 + a.x2 - b.x1 - b.x2) / 2, (a.y1 + a.y2 - b.y1 - b.y2) / 2)
