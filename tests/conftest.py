# Every test session starts from empty caches, so that no model converted or downloaded earlier on
# this machine can hide a missing install step. Set before anything imports transformers or
# huggingface_hub (they read these variables at import); subprocesses inherit them.
import atexit
import os
import shutil
import tempfile

_CACHES = {var: tempfile.mkdtemp(prefix=f"spa-rl-test-{var.lower()}-") for var in ("SPA_RL_CACHE", "HF_HOME")}
os.environ.update(_CACHES)
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE"):
    os.environ.pop(_var, None)  # these would override HF_HOME's sub-folders
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _CACHES.values()])

import pytest  # noqa: E402
import torch  # noqa: E402


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
