"""Where the shared test material lives: ../shared beside the checkout (CI lays it there too).
SHARED_DIR overrides it."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))
FHIR_EXAMPLES = SHARED / "fhir-examples"
KENYA_CSV = SHARED / "data" / "kenya_kmhfl_2020-05.csv"
