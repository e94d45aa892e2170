"""Regenerates the Python stubs in clients/python/prism_client/v1 from protos/prism/v1/*.proto.

Run `python -m prism.protogen` after editing a .proto; tests/test_protos.py
regenerates into a temporary folder and fails when the committed stubs differ.
The stubs belong to the client SDK's package (prism_client, clients/python),
which the services import them from too: protoc names their modules after the
.proto paths (prism.v1), so the imports and module names are rewritten to
prism_client.v1. The wire names stay prism.v1 (the .proto files' package).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
STUBS = REPO_ROOT / "clients" / "python" / "prism_client" / "v1"
# What protoc writes for the prism/v1 path, and what the stubs' package is.
GENERATED_MODULE, STUBS_MODULE = "prism.v1", "prism_client.v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "prism" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py into out_dir, importing each other as prism_client.v1."""
    with tempfile.TemporaryDirectory(prefix="prism-protoc-") as tmp:
        run_protoc(Path(tmp))
        out_dir.mkdir(parents=True, exist_ok=True)
        for stub in sorted((Path(tmp) / "prism" / "v1").iterdir()):
            (out_dir / stub.name).write_text(as_stubs_module(stub.read_text()))


def as_stubs_module(text: str) -> str:
    """A generated file with its imports of the other stubs, and its module name, in the stubs' package."""
    return text.replace(f"from {GENERATED_MODULE} import", f"from {STUBS_MODULE} import").replace(
        f"(DESCRIPTOR, '{GENERATED_MODULE}.", f"(DESCRIPTOR, '{STUBS_MODULE}."
    )


def run_protoc(out_dir: Path) -> None:
    """protoc's own output under out_dir/prism/v1."""
    import grpc_tools
    from grpc_tools import protoc  # only needed by developers and the check

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))


if __name__ == "__main__":
    generate(STUBS)
    print(f"generated stubs for {len(proto_files())} protos into {STUBS}", file=sys.stderr)
