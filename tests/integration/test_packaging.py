"""What `pip install .` gets: every package, and the tab's files, with no build step."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_every_package_and_the_whole_tab(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("tb_microscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent for p in (ROOT / "tb_microscope").rglob("__init__.py")]
    for package in packages:
        assert f"{package.relative_to(ROOT).as_posix()}/__init__.py" in names, package
    tab = [p for p in (ROOT / "frontend").rglob("*") if p.suffix in (".js", ".css")]
    assert len(tab) >= 8
    for path in tab:
        assert f"tb_microscope/static/{path.relative_to(ROOT / 'frontend').as_posix()}" in names

    # A plain install brings what renders and serves, no test tooling; the rest are extras.
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    plain = {re.split(r"[ <>=!;\[]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert "torch" in plain and "tensorboard" in plain, plain
    for tool in ("pytest", "torch-lucent", "kornia", "coverage", "ipython", "ruff", "playwright"):
        assert tool not in plain, f"{tool} in a plain install: {sorted(plain)}"
    extras = {
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Provides-Extra:")
    }
    assert {"lightning", "transformers", "mlflow", "ray", "test", "bench"} <= extras, extras


def test_help_and_a_mistyped_command_answer_without_importing_torch(tmp_path):
    """`tb-microscope --help`, a mistyped command or render option, a log directory that is not
    there or holds no run (and the package's import) load no torch: they answer at once."""
    (tmp_path / "empty" / "plugins").mkdir(parents=True)  # a TensorBoard log dir, but no run
    check = (
        "import sys, contextlib, io\n"
        "import tb_microscope\n"
        "from tb_microscope.cli import main\n"
        "empty, missing = sys.argv[1] + '/empty', sys.argv[1] + '/missing'\n"
        "for argv in (['--help'], ['render', '--help'], ['rendr'],\n"
        "             ['render', '.', '--units', '0-3,x'], ['render', '.', '--steps', '5-x'],\n"
        "             ['render', '.', '--size', '2000'], ['render', '.', '--iterations', '0'],\n"
        "             ['render', '.', '--bands', 'red,green,blue'], ['render', empty],\n"
        "             ['info', missing], ['info', empty], ['dynamics', empty],\n"
        "             ['align', missing + '@1', empty + '@2', '--node', 'conv1']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    print(out.getvalue())\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
        "print(tb_microscope.Logger.__name__, 'torch loaded:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "{info,render,dynamics,align,atlas,concepts,demo}" in proc.stdout
    assert "--iterations" in proc.stdout  # render's own help
    assert "invalid choice: 'rendr'" in proc.stdout
    assert "--units takes numbers and ranges like 0-15,32 or 64-; got '0-3,x'" in proc.stdout
    assert "--steps takes numbers and ranges like 0-15,32 or 64-; got '5-x'" in proc.stdout
    assert "--size must be a whole number of pixels from 8 to 1024, got 2000" in proc.stdout
    assert "--iterations must be a whole number from 1 to 100000, got 0" in proc.stdout
    assert "--bands takes three channel numbers like 3,2,1; got 'red,green,blue'" in proc.stdout
    assert f"no tb_microscope runs to render under '{tmp_path}/empty'" in proc.stdout
    assert f"'{tmp_path}/missing' is not a directory" in proc.stdout
    assert f"no tb_microscope runs under '{tmp_path}/empty'" in proc.stdout
    assert f"no tb_microscope run at '{tmp_path}/empty'" in proc.stdout
    assert "torch loaded: False\nLogger torch loaded: True" in proc.stdout, proc.stdout
