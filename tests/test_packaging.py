"""The package as pip installs it: ``twistd --help`` lists the plugin from a wheel."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_installed_wheel_provides_the_twistd_plugin(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(dist), ROOT], check=True, timeout=600)
    [wheel] = glob.glob(str(dist / "smtpbridge-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                    "--disable-pip-version-check", wheel], check=True, timeout=600)

    listing = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True,
                             text=True, check=True, cwd=tmp_path, timeout=120).stdout
    assert "smtpbridge" in listing
    usage = subprocess.run([str(venv / "bin" / "twistd"), "smtpbridge", "--help"],
                           capture_output=True, text=True, check=True, cwd=tmp_path,
                           timeout=120).stdout
    assert "--config" in usage
    # The plugin directory must not have become a package shadowing Twisted's own.
    show = "import os, twisted.plugins; print(os.listdir(twisted.plugins.__path__[0]))"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", show], capture_output=True,
                          text=True, check=True, cwd=tmp_path).stdout
    assert "smtpbridge_plugin.py" in site and "twisted_web.py" in site
    assert subprocess.run([str(venv / "bin" / "smtpbridge"), "--help"], cwd=tmp_path,
                          capture_output=True, timeout=60).returncode == 0
