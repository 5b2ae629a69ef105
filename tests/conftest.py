import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("QKV_HYPOTHESIS", "default"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_report_header(config):
    from browser import version

    return f"browser for the HTML tests: {version()}"


def pytest_terminal_summary(terminalreporter):
    """Name the browser the HTML tests ran with (also with -q, where the header is not shown)."""
    import browser

    if browser.USED:
        terminalreporter.write_line(f"browser for the HTML tests: {browser.version()}")
