"""What the artist reads while a job runs: stage text in plain words, and an ETA from measured speeds.

Standard library only, no bpy (tests feed it recorded timelines).

The ETA is measured, never taken from fixed stage weights: the backend's overall progress is not
linear in time (a compile on the first fit steps, meshing that is slow on CPU, a skipped stage that
makes progress jump). So the estimator keeps, per job kind, the timeline of the last finished job
(how many seconds each stage took, and over which stretch of overall progress) and predicts the
rest of a new job from it, scaled by how fast this job has been so far compared with that one.
Without a previous job it uses the recent progress rate (a sliding window that forgets the start).
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
    WINDOW_SHARE = 0.4  # the rate is measured over the last 40 % of the elapsed time

    def __init__(self, previous: list[dict] | None = None):
        self.previous = [dict(s) for s in previous or [] if s.get("p1", 0) > s.get("p0", 0)]
        self.samples: list[tuple[float, float]] = []
        self.stages: list[dict] = []  # {"stage", "p0", "p1", "t0", "t1"}
        self.start: float | None = None

    def update(self, now: float, stage: str, progress: float) -> None:
        if self.start is None:
            self.start = now
        progress = max(0.0, min(1.0, float(progress)))
        if self.samples and progress < self.samples[-1][1]:
            progress = self.samples[-1][1]
        self.samples.append((now, progress))
        if not self.stages or self.stages[-1]["stage"] != stage:
            if self.stages:
                self.stages[-1]["p1"], self.stages[-1]["t1"] = progress, now
            self.stages.append({"stage": stage, "p0": progress, "p1": progress, "t0": now, "t1": now})
        else:
            self.stages[-1]["p1"], self.stages[-1]["t1"] = progress, now

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
        return sum(s["t1"] - s["t0"] for s in self.previous)

    def _previous_time_at(self, progress: float) -> float:
        """Seconds the previous job needed to reach `progress`."""
        total = 0.0
        for s in self.previous:
            span, seconds = s["p1"] - s["p0"], s["t1"] - s["t0"]
            if progress >= s["p1"]:
                total += seconds
            elif progress > s["p0"]:
                total += seconds * (progress - s["p0"]) / span
        return total

    def _from_previous(self, progress: float, elapsed: float) -> float:
        before = self._previous_time_at(progress)
        # This job's speed relative to the previous one, once there is enough of it to compare.
        scale = elapsed / before if before > 1.0 and elapsed > 1.0 else 1.0
        scale = max(0.25, min(4.0, scale))
        return max(0.0, (self._previous_total() - before) * scale)

    def timeline(self) -> list[dict]:
        """The stages as measured, to predict the next job of the same kind."""
        return [{k: s[k] for k in ("stage", "p0", "p1", "t0", "t1")} for s in self.stages]


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
            start = timeline[0]["t0"]
            shifted = [dict(s, t0=s["t0"] - start, t1=s["t1"] - start) for s in timeline]
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
