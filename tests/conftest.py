"""Shared fixtures: a private kdq_bench cache for the whole session and one tiny trained teacher."""
import pytest

from kdq_bench.testing import TINY_RECIPE, cache_at


@pytest.fixture(scope="session", autouse=True)
def kdq_cache(tmp_path_factory):
    "Every test runs against a private cache folder: the user's ~/.cache/kdq_bench is never read or written."
    with cache_at(tmp_path_factory.mktemp("kdq_cache")) as d:
        yield d


@pytest.fixture(scope="session")
def tiny_teacher(kdq_cache):
    "The tiny embedded-recipe teacher (`kdq_bench.testing.TINY_RECIPE`), trained once per session (seconds)."
    from kdq_bench.models import embedded_teacher
    return embedded_teacher(TINY_RECIPE, progress=False)
