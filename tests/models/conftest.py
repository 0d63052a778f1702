import pytest


@pytest.fixture(autouse=True, scope="module")
def _tiny_tensors_one_thread(one_intra_op_thread):  # tests/conftest.py
    yield
