"""The stdlib `ssl` must never be shadowed: the stages live inside the one import package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_ssl_anywhere():
    assert not (ROOT / "ssl").exists()
    assert not list(ROOT.glob("**/ssl.py")), "a file named ssl.py shadows the stdlib"
    assert not (ROOT / "tests" / "ssl").exists()


def test_stdlib_ssl_and_transformers_import_from_repo_root():
    code = ("import ssl, reprlab.ssl, transformers; "
            "assert ssl.__file__ and 'reprlab' not in ssl.__file__, ssl.__file__; "
            "assert reprlab.ssl.__file__.endswith('reprlab/ssl/__init__.py'); print(ssl.OPENSSL_VERSION)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SSL" in out.stdout


def test_import_reprlab_is_light():
    code = "import sys, reprlab; assert 'torch' not in sys.modules; print(reprlab.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
