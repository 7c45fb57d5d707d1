"""The panel's ETA (im3d_blender/progress.py) converges: within 25 % of the real total after the first
quarter of a job, on timelines shaped like the real main job (bench/bench_eta.py measures it on the
real one).

The shape that fooled the old ETA ("7:52" for a 63 s job): a compile stall on the first fit steps,
a stage the job skips (overall progress jumps), meshing that is slow for its share of progress.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from im3d_blender.progress import EtaEstimator, SpeedMemory, format_eta, stage_text  # noqa: E402



def refine_timeline(scale: float = 1.0, stall: float = 8.0, poll: float = 0.25) -> list[tuple[float, str, float]]:
    """(time, stage, overall progress) as the add-on polls them, for a Refine with diffusion off.

    Stage shares of progress are the backend's weights (load 0.02, fit 0.4, refine 0.2 — skipped —,
    mesh 0.08, export 0.02 out of 0.72); the seconds are those of the main job on 2 CPU cores.
    """
    total_weight = 0.72
    spans = {"load": (0.0, 0.02 / total_weight), "fit": (0.02 / total_weight, 0.42 / total_weight),
             "mesh": (0.62 / total_weight, 0.70 / total_weight), "export": (0.70 / total_weight, 1.0)}
    seconds = {"load": 2.0, "fit": 40.0, "mesh": 15.0, "export": 1.0}
    samples, t = [], 0.0
    for stage in ("load", "fit", "mesh", "export"):
        p0, p1 = spans[stage]
        length = seconds[stage] * scale
        start = t
        while t < start + length:
            x = (t - start) / length
            if stage == "fit":  # the first steps wait for a compile, then steps run at an even pace
                warm = stall * scale / length
                x = 0.01 * x / warm if x < warm else 0.01 + 0.99 * (x - warm) / (1 - warm)
            if stage == "mesh":  # grid, cleanup, UV, bake: reported in coarse steps
                x = int(x * 5) / 5
            samples.append((t, stage, p0 + (p1 - p0) * x))
            t += poll
    samples.append((t, "export", 1.0))
    return samples


def worst_error_after_quarter(samples, previous=None) -> float:
    estimator = EtaEstimator(previous)
    total = samples[-1][0] - samples[0][0]
    worst = 0.0
    for t, stage, progress in samples[:-1]:
        estimator.update(t, stage, progress)
        elapsed = t - samples[0][0]
        remaining = estimator.remaining(t)
        if elapsed >= total / 4:
            assert remaining is not None, f"no estimate at {elapsed:.1f} s of {total:.1f} s"
            worst = max(worst, abs(elapsed + remaining - total) / total)
    return worst


def test_first_job_without_measured_speeds_converges_within_a_quarter():
    assert worst_error_after_quarter(refine_timeline()) <= 0.25


def test_a_job_after_a_measured_one_is_predicted_closely_even_on_a_slower_machine():
    first = EtaEstimator()
    for t, stage, progress in refine_timeline():
        first.update(t, stage, progress)
    # The same job with the machine 1.6x slower (another program running): scaled from the measured timeline.
    assert worst_error_after_quarter(refine_timeline(scale=1.6), previous=first.timeline()) <= 0.10
    # ... and before it has reported anything, the estimate is the measured job's length, not nothing.
    assert EtaEstimator(first.timeline()).remaining(0.0) == pytest.approx(refine_timeline()[-1][0], rel=0.02)


def test_the_old_whole_job_average_would_fail_this_timeline():
    """The test has teeth: elapsed * (1 - p) / p (the backend's eta_s) is far off after the first quarter."""
    samples = refine_timeline()
    total = samples[-1][0]
    worst = max(abs(t + t * (1 - p) / p - total) / total for t, _, p in samples[:-1] if t >= total / 4 and p > 0)
    assert worst > 0.25


def test_speed_memory_survives_a_restart(tmp_path):
    memory = SpeedMemory(tmp_path / "speeds.json")
    estimator = EtaEstimator()
    for t, stage, progress in refine_timeline():
        estimator.update(100.0 + t, stage, progress)
    memory.remember_timeline("refine-fast-nodiffusion", estimator.timeline())
    memory.remember_seconds("turntable-view-256px-16spp", 0.9)
    again = SpeedMemory(tmp_path / "speeds.json")
    timeline = again.timeline("refine-fast-nodiffusion")
    assert timeline[0]["t"] == 0.0 and timeline[-1]["p"] > 0.99 and again.seconds("turntable-view-256px-16spp") == 0.9
    assert SpeedMemory(tmp_path / "missing" / "speeds.json").timeline("x") is None


def test_stage_text_is_for_artists():
    assert stage_text("fit") == "Building the 3D shape" and stage_text("mesh") == "Making the mesh and its texture"
    assert stage_text("some_new_stage") == "Some new stage"
    assert format_eta(75) == "1:15 left" and format_eta(4.2) == "4 s left" and format_eta(None) == ""
