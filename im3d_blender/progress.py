"""What the artist reads while a job runs: stage text in plain words, and an ETA from measured speeds.

Standard library only, no bpy (tests feed it recorded timelines).

The ETA is measured, never taken from fixed stage weights: the backend's overall progress is not
linear in time (a compile on the first fit steps, meshing that is slow on CPU, a skipped stage that
makes progress jump). So the estimator keeps, per job kind, the timeline of the last finished job
(when it reached which progress, in which stage) and predicts the rest of a new job from it, scaled
by how fast this job has been so far compared with that one at the same progress. Without a
previous job it uses the recent progress rate (a sliding window that forgets the start).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Backend stage names (im3d.pipeline) in words an artist understands.
STAGE_TEXT = {
    "queued": "Waiting for the backend",
    "load": "Reading the turntable views",
    "reference": "Painting the reference image",
    "orbit": "Imagining the object from all sides",
    "fit": "Building the 3D shape",
    "refine": "Sharpening details",
    "mesh": "Making the mesh and its texture",
    "export": "Saving the result",
    "upload": "Sending to the backend",
    "download": "Fetching the result",
    "done": "Done",
}

# Add-on phases before and after the backend's job.
PHASE_TEXT = {
    "starting": "Starting the backend…",
    "checking": "Checking the models…",
    "turntable": "Rendering the turntable",
    "importing": "Putting the result in the scene",
}


def stage_text(stage: str) -> str:
    return STAGE_TEXT.get(stage, stage.replace("_", " ").capitalize() if stage else "Working")


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{max(seconds, 1)} s left"
    return f"{seconds // 60}:{seconds % 60:02d} left"


class EtaEstimator:
    """Remaining seconds of one backend job from (time, stage, overall progress) samples."""

    WINDOW_MIN_S = 3.0
    WINDOW_SHARE = 0.25  # without a previous job: the rate over the last quarter of the elapsed time

    def __init__(self, previous: list[dict] | None = None):
        points = [p for p in previous or [] if isinstance(p, dict) and "t" in p and "p" in p]
        self.previous = points if len(points) >= 2 and points[-1]["p"] > points[0]["p"] else []
        self.samples: list[tuple[float, float]] = []
        self.history: list[tuple[float, str, float]] = []  # (time, stage, progress) as reported
        self.start: float | None = None

    def update(self, now: float, stage: str, progress: float) -> None:
        if self.start is None:
            self.start = now
        progress = max(0.0, min(1.0, float(progress)))
        if self.samples and progress < self.samples[-1][1]:
            progress = self.samples[-1][1]
        self.samples.append((now, progress))
        self.history.append((now, stage, progress))

    def remaining(self, now: float) -> float | None:
        if self.start is None or not self.samples:
            return self._previous_total() if self.previous else None
        elapsed = now - self.start
        progress = self.samples[-1][1]
        if progress >= 1.0:
            return 0.0
        if self.previous:
            return self._from_previous(progress, elapsed)
        if progress < 0.02 or elapsed < 1.0:
            return None
        since = now - max(self.WINDOW_MIN_S, self.WINDOW_SHARE * elapsed)
        t0, p0 = next(((t, p) for t, p in self.samples if t >= since), self.samples[0])
        rate = (progress - p0) / (now - t0) if now - t0 > 0.5 and progress > p0 else progress / elapsed
        return (1.0 - progress) / rate if rate > 0 else None

    def _previous_total(self) -> float:
        return self.previous[-1]["t"] - self.previous[0]["t"]

    def _previous_time_at(self, progress: float) -> float:
        """Seconds the previous job needed to reach `progress` (its recorded points, interpolated)."""
        points, start = self.previous, self.previous[0]["t"]
        for before, after in zip(points, points[1:]):
            if after["p"] >= progress:
                span = after["p"] - before["p"]
                x = (progress - before["p"]) / span if span > 0 else 1.0
                return before["t"] - start + max(0.0, min(1.0, x)) * (after["t"] - before["t"])
        return self._previous_total()

    def _from_previous(self, progress: float, elapsed: float) -> float:
        before = self._previous_time_at(progress)
        # This job's speed relative to the previous one at the same progress, once there is enough to compare.
        scale = elapsed / before if before > 2.0 and elapsed > 2.0 else 1.0
        scale = max(0.25, min(4.0, scale))
        return max(0.0, (self._previous_total() - before) * scale)

    def timeline(self, step: float = 0.005) -> list[dict]:
        """The job as measured (a point per `step` of progress and per stage change), for the next job of this kind."""
        points: list[dict] = []
        for t, stage, progress in self.history:
            if not points or stage != points[-1]["stage"] or progress - points[-1]["p"] >= step:
                points.append({"t": t, "stage": stage, "p": progress})
        if self.history and points[-1]["t"] != self.history[-1][0]:
            t, stage, progress = self.history[-1]
            points.append({"t": t, "stage": stage, "p": progress})
        return points


class SpeedMemory:
    """Measured timelines of finished jobs and seconds per turntable view, kept in a small JSON file."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.data: dict = {}
        if self.path is not None:
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.data = {}

    def timeline(self, key: str) -> list[dict] | None:
        value = self.data.get("timelines", {}).get(key)
        return value if isinstance(value, list) else None

    def remember_timeline(self, key: str, timeline: list[dict]) -> None:
        if timeline:
            start = timeline[0]["t"]
            shifted = [dict(point, t=point["t"] - start) for point in timeline]
            self.data.setdefault("timelines", {})[key] = shifted
            self._save()

    def seconds(self, key: str) -> float | None:
        value = self.data.get("seconds", {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def remember_seconds(self, key: str, seconds: float) -> None:
        self.data.setdefault("seconds", {})[key] = float(seconds)
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self.data), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError:
            pass  # an ETA is a nicety; never fail a job over it
