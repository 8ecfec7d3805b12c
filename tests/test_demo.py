"""The README's first command: the demo runs end to end in a real subprocess."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "verify: every checksum holds" in out
    assert (tmp_path / "db.emb").exists() and (tmp_path / "embeddings.pkl").exists()
    assert sorted(os.listdir(tmp_path)) == ["db.emb", "embeddings.pkl"]  # no temporary left behind
