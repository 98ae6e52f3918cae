import pytest

from pyro_nlme.data import load_orange, load_soybean
from pyro_nlme.reference import exact_mle


@pytest.fixture(scope="session")
def orange_data():
    return load_orange()


@pytest.fixture(scope="session")
def soybean_data():
    return load_soybean()


@pytest.fixture(scope="session")
def orange_exact(orange_data):
    return exact_mle(orange_data)
