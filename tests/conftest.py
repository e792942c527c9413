import pytest
import torch


@pytest.fixture
def float64():
    """Run a test in float64 so formula checks can be tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
