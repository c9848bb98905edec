from __future__ import annotations

import logging
import os
import tempfile
import warnings

import pytest

import moec

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
# --autotune's timings go to a cache of this run's own, not the user's
os.environ["MOEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="moec-test-cache-")


@pytest.fixture(scope="session")
def zoo_artifact(tmp_path_factory):
    """compile zoo:NAME for a target once per session: get(name, target) -> CompileResult."""
    cache = {}

    def get(name: str, target: str):
        if (name, target) not in cache:
            out = tmp_path_factory.mktemp("artifacts") / f"{name}-{target}"
            cache[name, target] = moec.compile(f"zoo:{name}", target=target, output=out)
        return cache[name, target]

    return get
