"""asteria.config() and the LAPACK provider selection."""

import os
import subprocess
import sys

import pytest

import asteria
from asteria import _core


def test_config_reports_provider_and_build():
    cfg = asteria.config()
    assert cfg["lapack"]["name"] in ("openblas", "mkl")
    assert cfg["lapack"]["threads"] == 1
    assert cfg["version"] == asteria.__version__
    assert os.path.exists(cfg["openblas_library"])
    assert isinstance(cfg["cuda_built"], bool)


def test_unknown_provider_is_a_value_error():
    with pytest.raises(ValueError, match="unknown LAPACK provider"):
        asteria.select_provider("atlas")


def test_missing_mkl_is_a_clear_error_and_keeps_openblas(monkeypatch):
    from asteria import _loader

    if _loader.find_mkl_runtime() is not None:
        pytest.skip("MKL is installed here")
    with pytest.raises(asteria.AsteriaError, match="pip install 'asteria\\[mkl\\]'"):
        asteria.select_provider("mkl")
    assert _core.linalg.provider()["name"] == "openblas"


def test_environment_variable_selects_provider():
    env = dict(os.environ, ASTERIA_LAPACK="openblas")
    out = subprocess.run(
        [sys.executable, "-c", "import asteria; print(asteria.config()['lapack']['name'])"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "openblas"


def test_mkl_provider_when_installed():
    from asteria import _loader
    import numpy as np

    if _loader.find_mkl_runtime() is None:
        pytest.skip("MKL not installed (pip install 'asteria[mkl]')")
    try:
        asteria.select_provider("mkl")
        a = np.random.default_rng(0).standard_normal((32, 32))
        a = a @ a.T + np.eye(32)
        w, _ = _core.linalg.eigh(a)
        np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=1e-10)
    finally:
        asteria.select_provider("openblas")
