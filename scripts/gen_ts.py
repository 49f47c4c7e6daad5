"""Regenerate clients/typescript/src/gen from proto/ with buf and the local protoc-gen-es.

The plugin comes from clients/typescript/node_modules (`make ts-deps` = `npm ci`),
so the generator version is the one pinned in package-lock.json. `--check`
generates into a temporary directory and fails if the committed tree differs,
like scripts/gen_protos.py does for Python.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TS = ROOT / "clients" / "typescript"
TEMPLATE = TS / "buf.gen.yaml"
PLUGIN = TS / "node_modules" / ".bin" / "protoc-gen-es"
OUT_REL = Path("clients") / "typescript" / "src" / "gen"
BUF = Path(sys.executable).parent / "buf"


def generate(base: Path) -> Path:
    """Runs `buf generate` with its outputs under `base`; returns the generated tree."""
    if not PLUGIN.exists():
        raise SystemExit(f"{PLUGIN.relative_to(ROOT)} is missing: run `make ts-deps` (npm ci) first")
    cmd = [str(BUF), "generate", "--template", str(TEMPLATE.relative_to(ROOT)), "--output", str(base)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return base / OUT_REL


def tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if src/gen is stale")
    args = parser.parse_args()
    out = ROOT / OUT_REL
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        new, old = tree(fresh), tree(out)
        stale = sorted(
            set(new) ^ set(old)
            | {k for k in set(new) & set(old) if not filecmp.cmp(new[k], old[k], shallow=False)}
        )
        if args.check:
            if stale:
                print(f"{OUT_REL} is stale; run `make ts-gen`:", *stale, sep="\n  ")
                return 1
            print(f"{OUT_REL} is up to date ({len(new)} files)")
            return 0
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(fresh, out)
        print(f"generated {len(new)} files into {OUT_REL} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
