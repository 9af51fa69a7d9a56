"""Kernel tests: register the gpu marker so they also run from a bare copy on the GPU machine."""


def pytest_configure(config):
    # also registered in pyproject; repeated for runs outside the repository's rootdir
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU machines, run on the lent GPU)")
