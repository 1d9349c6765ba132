"""The GPU tests collect on a machine that has only what `bench/gpu_check.sh` brings: torch, Triton,
the core dependencies and pytest. The test extras (scipy, matplotlib, DALI, diffusers) and lpips are
made unimportable in a child pytest, which must collect every module without an error: a module
that imports an extra at import time would stop `pytest -m gpu` before any GPU test runs."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

EXTRAS = ("scipy", "matplotlib", "nvidia.dali", "diffusers", "lpips")


def test_gpu_tests_collect_without_the_test_extras(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == extra or name.startswith(extra + ".") for extra in {EXTRAS!r}):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Missing())
    """))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                             "no:cacheprovider", str(root / "tests")], capture_output=True, text=True, env=env,
                            cwd=root, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "error" not in result.stdout.lower(), result.stdout[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(collected) >= 10 and any("test_gpu.py::" in line for line in collected), result.stdout[-3000:]
