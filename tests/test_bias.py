"""python -m gammacl.experiments.bias: the math.md §A.7 toy at a small scale (2 seeds)."""

import subprocess
import sys

import numpy as np

from gammacl.experiments import bias


def test_bias_toy_qualitative_result():
    """Plain minibatch training converges to the wrong point; the gamma estimator with the
    exact rate reaches theta* = 1; the moving-average variants (ema = 0.02) get close; SogCLR
    with ema = 0.9 behaves like the plain loss (math.md §A.7 takeaways)."""
    res = bias.run(steps=2000, seeds=2, negatives=(8,))
    final = dict(zip(res["variants"], res["final"][0].mean(axis=1), strict=True))
    assert res["final"].shape == (1, len(bias.VARIANTS), 2)
    assert final["naive minibatch"] > 1.25
    assert abs(final["SEM exact rate"] - 1.0) < 0.1
    assert abs(final["SEM ema=0.02"] - 1.0) < 0.15
    assert abs(final["SogCLR ema=0.02"] - 1.0) < 0.15
    assert final["SogCLR ema=0.9"] > 1.25
    assert res["traj"].shape[:3] == (1, len(bias.VARIANTS), 2) and res["steps"][-1] == 2000
    assert np.allclose(res["traj"][..., -1], res["final"])


def test_bias_module_cli(tmp_path):
    out = tmp_path / "theta.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gammacl.experiments.bias",
            "--steps",
            "300",
            "--seeds",
            "2",
            "--negatives",
            "2",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    text = proc.stdout
    assert "toy derived from the paper's description" in text
    assert "not the paper's own setup" in text
    assert "naive minibatch" in text and "SEM exact rate" in text
    assert len([ln for ln in text.splitlines() if ln.startswith(("2 |", "8 |"))]) == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert out.is_file() and out.stat().st_size > 1000
