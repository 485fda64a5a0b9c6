"""Soak (issue 17): 1,000 episodes of a scripted agent mixing good and bad code, four envs on four
threads sharing one sandbox, run by `bench/soak.py` in a process of its own so that its figures
(host RSS, open fds, descendant processes) are that process's alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # ~1-2 minutes on a loaded 2-core box
def test_a_thousand_mixed_episodes_on_four_threads_leak_nothing(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    out = tmp_path / "soak.json"
    subprocess.run([sys.executable, str(script), "--episodes", "1000", "--threads", "4", "--workers", "2",
                    "--timeout-s", "1.0", "--json", str(out)], check=True, timeout=1200)
    figures = json.loads(out.read_text())
    assert figures["episodes"] == 1000 and figures["errors"] == []
    # the mix really was mixed: failures, calls without an image, calls the wall clock stopped
    assert figures["failed"] > 0 and figures["no_image"] > 0 and figures["timeouts"] > 0
    assert figures["calls"] - figures["failed"] > 0
    growth = figures["growth"]  # second half minus first half of the run (medians, after warm-up)
    assert growth["fds"] <= 1 and growth["children"] <= 0.5
    assert growth["rss_mb"] < 64, f"host RSS grew by {growth['rss_mb']:.1f} MiB over the run"
    assert figures["left_after_close"] == []
