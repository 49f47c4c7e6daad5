"""Fixtures of the end-to-end tests that run the TypeScript client and BFF under node."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.bff_support import TS, run


@pytest.fixture(scope="session")
async def node_client() -> Path:
    """Compiles the TypeScript client, BFF and page once; fails (never skips) without node or deps."""
    node = shutil.which("node")
    assert node, "node is not installed: the TypeScript tests need Node.js 20+"
    tsc = TS / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "clients/typescript/node_modules is missing: run `make ts-deps` (npm ci)"
    # A clean build: tsc never deletes outputs whose sources are gone (e.g. a service's module).
    shutil.rmtree(TS / "dist", ignore_errors=True)
    await run(str(tsc), "-p", str(TS))
    script = TS / "dist" / "examples" / "interop.js"
    assert script.exists()
    return script
