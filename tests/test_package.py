"""The package installs: a wheel built from the checkout holds every module of ``phi3_lora``.

The scripts put the checkout on ``sys.path`` themselves, so the rest of the suite would pass even if
``pip install .`` installed nothing importable (as it did while ``phi3_lora`` had no ``__init__.py``).
"""

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_holds_every_module_and_imports_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("phi3_lora-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("phi3_lora/")}
    modules = {f"phi3_lora/{path.name}" for path in (ROOT / "phi3_lora").glob("*.py")}
    assert "phi3_lora/__init__.py" in modules and shipped == modules
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = "import phi3_lora.loop, phi3_lora.config; print(phi3_lora.loop.__file__)"
    where = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, 'site'); {probe}"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(tmp_path / "site" / "phi3_lora" / "loop.py")
