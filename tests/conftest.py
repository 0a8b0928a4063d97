import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # the test models are tiny: OpenMP threads only contend for the 2 cores (10x slower under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    from rl.models import load_tokenizer

    return load_tokenizer("tiny")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
