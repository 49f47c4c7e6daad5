"""Regenerate generated/python from proto/ (python, .pyi and grpc stubs).

`--check` regenerates into a temporary directory and fails if the committed
tree differs, so CI catches stale generated code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "generated" / "python"
# Files in OUT that are not protoc output.
KEEP = {"pyproject.toml"}


def generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages, so the tree installs and type-checks like any other.
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        (d / "__init__.py").touch()
    (out / "entrepot" / "py.typed").touch()


def tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in KEEP and ".egg-info" not in str(p)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated/python is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        new, old = tree(fresh), tree(OUT)
        stale = sorted(
            set(new) ^ set(old)
            | {k for k in set(new) & set(old) if not filecmp.cmp(new[k], old[k], shallow=False)}
        )
        if args.check:
            if stale:
                print("generated/python is stale; run `make gen`:", *stale, sep="\n  ")
                return 1
            print(f"generated/python is up to date ({len(new)} files)")
            return 0
        for rel in set(old) - set(new):
            old[rel].unlink()
        for rel, src in new.items():
            dst = OUT / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        print(f"generated {len(new)} files into {OUT.relative_to(ROOT)} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
