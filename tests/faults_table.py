"""Print the fault-injection table that ``make faults`` collects (one JSON row per fault from tests/test_faults.py).

Every figure is computed by the test: stored, stored twice and lost from the store (read-only) and the sender's
keys; acked as duplicate from the sender's acks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    head = (
        "fault",
        "how injected",
        "sent",
        "stored",
        "stored twice",
        "acked as duplicate",
        "lost",
        "time to recover (s)",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        dup = "—" if r["acked_as_duplicate"] is None else r["acked_as_duplicate"]  # None: the sender reads no acks
        cells = (r["fault"], r["how"], r["sent"], r["stored"], r["duplicates"], dup, r["lost"], f"{r['recover_s']:.1f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0 if rows and all(r["lost"] == 0 and r["duplicates"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
