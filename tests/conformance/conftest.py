"""The matrix's user entry is registered for each module of this folder, and removed after."""

import pytest

from tests.conformance.references import user_entry_registered


@pytest.fixture(autouse=True, scope="module")
def _user_entry():
    with user_entry_registered():
        yield
