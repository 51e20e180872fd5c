"""`make demo SEED=N`: every training of the demo gets its own seed and its own folders, and the
default seed keeps the default ones (docs/results.md, "Figures a newcomer reproduces")."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def _dry(*args) -> subprocess.CompletedProcess:
    """The commands `make -n` would run (nothing is executed)."""
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT,
                          capture_output=True, text=True)


def _commands(text: str) -> list[str]:
    return [c for c in text.replace("\\\n", " ").splitlines() if "python" in c]


def test_seed_n_trains_both_pairs_and_the_model_with_its_own_seeds_and_folders():
    res = _dry("demo", "SEED=3")
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    ctgan = [c for c in cmds if "procedures.ctgan.train" in c]
    assert len(ctgan) == 4
    seen = [c for c in ctgan if "/holdout/" not in c]
    unseen = [c for c in ctgan if "/holdout/" in c]
    assert all("--seed 6 " in c and "models/seed3/" in c for c in seen), seen
    assert all("--seed 7 " in c and "models/seed3/holdout/" in c for c in unseen), unseen
    train = next(c for c in cmds if "train.py" in c and "procedures" not in c)
    assert "--seed 3" in train and "--out_dir runs/seed3/demo" in train
    ev = next(c for c in cmds if "evaluate.py" in c)
    assert "--models models/seed3 " in ev and "--holdout-models models/seed3/holdout" in ev
    assert "--checkpoint runs/seed3/demo/checkpoint.pt" in ev and "--out runs/seed3/demo/eval" in ev
    # nothing of seed 3 reads or writes the default models or runs
    assert not any(" models/INJ" in c or " models/REM" in c or "models/holdout" in c.replace(
        "models/seed3/holdout", "") or "runs/demo" in c.replace("runs/seed3/demo", "") for c in cmds)
    # every step runs with the fixed thread count
    assert all("OMP_NUM_THREADS=2" in c for c in ctgan + [train, ev])


def test_default_seed_is_the_default_demo():
    cmds = _commands(_dry("demo").stdout)
    ctgan = [c for c in cmds if "procedures.ctgan.train" in c]
    assert sorted(c.split("--out ")[1].split()[0] for c in ctgan) == \
        ["models/INJ", "models/REM", "models/holdout/INJ", "models/holdout/REM"]
    assert all(("--seed 1 " in c) == ("/holdout/" in c) for c in ctgan)
    train = next(c for c in cmds if "train.py" in c and "procedures" not in c)
    assert "--out_dir runs/demo" in train and "--seed 0" in train


@pytest.mark.parametrize("bad", ["x", "-1", "1.5", "1 2"])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused(bad):
    res = _dry("demo", f"SEED={bad}")
    assert res.returncode != 0 and "SEED must be a non-negative integer" in res.stderr
