import pytest
from hypothesis import HealthCheck, settings

from opsutil import INTERPRET, backend, cpu_backends

settings.register_profile("ops", deadline=None, max_examples=8 if INTERPRET else 40,
                          derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("ops")


@pytest.fixture(params=cpu_backends())
def cpu_backend(request):
    """Runs the test once per backend that works on CPU tensors in this process."""
    with backend(request.param):
        yield request.param
