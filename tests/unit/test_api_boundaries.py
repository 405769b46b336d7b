"""The API process never imports training libraries (it must start fast and stay small)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_api_does_not_import_training_libraries(tmp_path) -> None:
    code = (
        "import sys, json\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from app.settings import Settings\n"
        f"app = create_app(Settings(var_dir={str(tmp_path)!r}, run_dispatcher=False))\n"
        "TestClient(app).get('/healthz')\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'worker', 'inference')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
