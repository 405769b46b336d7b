"""A trainer that crashes on every attempt (IPO_TRAINER_MODULE=tests.reliability.crashing_trainer).

Same command line as ``worker.training.run`` (REQUEST_JSON --report-fd N); sends no error report and
exits with status 3, which the supervisor treats as a retryable crash.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    print(f"simulated crash in attempt {request['attempt']}", flush=True)
    sys.exit(3)
