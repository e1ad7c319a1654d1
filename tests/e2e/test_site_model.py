"""``--site`` with ``--model mlp``: naming the built-in shaped model explicitly, as docs/data.md says one may.

The sites serve ``mlp`` and ``cnn`` because they hold their own data; passing
``--model mlp`` on to them would make each refuse to start, since to a
worker's ``--model`` it is neither a registered model nor an import path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from syncfed.cli.coordinator import main as client_main


def write_sites(folder: Path) -> list[str]:
    """Three small tables and a test table, as ``--site`` entries."""
    rng = np.random.default_rng(0)
    sites = []
    for name in ("alice", "bob", "testing"):
        x = rng.normal(size=(40, 2))
        frame = pd.DataFrame({"age": x[:, 0], "dose": x[:, 1], "outcome": np.where(x[:, 0] > 0, "sick", "well")})
        frame.to_csv(folder / f"{name}.csv", index=False)
        sites += ["--site", f"{name}=csv:{folder / name}.csv"]
    return sites


def test_site_run_with_model_mlp_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        *write_sites(tmp_path),
        *("--worker-args", "--label-column outcome", "--model", "mlp", "--training-rounds", "1", "--no-progress"),
    ]
    code = client_main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "Final federated accuracy at round 1:" in out.out
