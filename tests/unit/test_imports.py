"""The science package runs without Ray and MLflow."""

import subprocess
import sys
import textwrap


def test_every_personalize_module_imports_with_ray_and_mlflow_blocked():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        for blocked in ("ray", "mlflow"):
            sys.modules[blocked] = None  # any import of it now raises ImportError
        import personalize
        names = [m.name for m in pkgutil.walk_packages(personalize.__path__, "personalize.")]
        for name in names:
            importlib.import_module(name)
        assert not any(k == "ray" or k.startswith(("ray.", "mlflow")) for k, v in sys.modules.items() if v is not None)
        print(len(names))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 20
