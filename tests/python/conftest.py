import os

import pytest
import torch


def pytest_report_header(config):
    import scrimp

    return f"scrimp build: {scrimp.build_info()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

