"""The core knows nothing of HTTP or torch: importing it loads neither."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "starlette", "pydantic", "torch", "transformers", "uvicorn")


def test_importing_the_engine_loads_no_http_framework_and_no_torch() -> None:
    code = (
        "import json, sys, batcher; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert loaded.isdisjoint(FORBIDDEN), loaded & set(FORBIDDEN)
