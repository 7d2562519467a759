"""Build hook: generate the gRPC stubs from proto/ before packaging (they are never committed)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement

    root = Path(__file__).parent / "proto"
    protos = sorted(str(p) for p in (root / "loraplex" / "v1").glob("*.proto"))
    args = [
        "protoc",
        f"-I{root}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
