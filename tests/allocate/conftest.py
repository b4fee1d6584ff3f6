import pytest


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every test in this folder runs under tests/conftest.py's `one_thread` (tiny models: extra threads only
    wait for each other on a shared machine)."""
