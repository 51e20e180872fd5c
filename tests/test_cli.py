"""Every entry point's --help: exit code 0 from main() itself, and no torch or TensorFlow loaded."""
import subprocess
import sys
from pathlib import Path

import pytest

from utils.cli import cli_main
from utils.errors import CliParser, UsageError

ROOT = Path(__file__).resolve().parents[1]
# docs/safety.md: the user-facing scripts answer --help without loading torch or TensorFlow
LIGHT = ["protect", "tamper", "evaluate", "GUI", "bench", "procedures.ctgan.train",
         "procedures.ctgan.demo", "procedures.data.prepare", "procedures.benchmarking.gpu_check"]
ENTRY_POINTS = LIGHT + ["procedures.protection.bound"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_returns_0_and_imports_no_torch_or_tensorflow(module):
    code = (f"import sys, {module} as m\n"
            "try:\n    rc = m.main(['--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "heavy = [k for k in ('torch', 'tensorflow', 'keras') if k in sys.modules]\n"
            "print('RC', rc, 'HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
    rc, heavy = r.stdout.strip().splitlines()[-1].split(" HEAVY ")
    assert rc == "RC 0"
    assert module not in LIGHT or heavy == "[]"


def test_cli_main_parses_then_runs_and_bad_arguments_are_usage_errors():
    def parser():
        p = CliParser(prog="x")
        p.add_argument("--n", type=int, required=True)
        return p

    @cli_main(parser)
    def main(args):
        return args.n

    assert main(["--n", "3"]) == 3
    with pytest.raises(UsageError):
        main(["--n", "three"])
