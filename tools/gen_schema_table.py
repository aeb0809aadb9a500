"""Print the README's column tables from the versioned table schemas in ``schemas/``.

Usage (from the repository root)::

    python tools/gen_schema_table.py [schemas/telemetry.v1.json schemas/rejected.v1.json ...]

With no arguments it documents every ``schemas/<table>.v<N>.json``. Each column's description is
its ``doc`` field; the Parquet writer builds its Arrow schema from the same files
(``ingest.schemas``), so the README and the files on disk cannot disagree.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
_TABLE_FILE = re.compile(r".+\.v\d+\.json")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(definition: dict[str, Any], source: str) -> str:
    lines = [
        f"**`{definition['table']}`** (schema version {definition['version']}, `{source}`): "
        f"{definition.get('description', '')}",
        "",
        "| Column | Type | Nullable | Description |",
        "|---|---|---|---|",
    ]
    for field in definition["fields"]:
        kind = f"`{field['type']}`"
        if field.get("dictionary"):
            kind += " (dictionary-encoded)"
        nullable = "yes" if field["nullable"] else "no"
        lines.append(
            f"| `{field['name']}` | {_cell(kind)} | {nullable} | {_cell(field.get('doc', '-'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = (
        [Path(arg) for arg in argv]
        if argv
        else sorted(p for p in SCHEMAS.glob("*.json") if _TABLE_FILE.fullmatch(p.name))
    )
    blocks = []
    for path in paths:
        definition = json.loads(path.read_text(encoding="utf-8"))
        try:
            source = path.resolve().relative_to(SCHEMAS.parent).as_posix()
        except ValueError:
            source = path.as_posix()
        blocks.append(table(definition, source))
    sys.stdout.write("\n\n".join(blocks) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
