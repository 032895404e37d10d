import pytest


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write fails the comparison."""
    monkeypatch.setenv("FUSECC_KERNELS_POISON", "1")
    yield
