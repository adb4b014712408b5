"""The ctypes structures match the C header: each field's offset and each struct's size,
as a C compiler lays them out. A field appended to the header without its ctypes twin,
or in another order, would otherwise be read from the wrong bytes without an error."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple, Type

from conftest import REPO_ROOT

import webpubsub_client._native as native

HEADER_DIR = REPO_ROOT / "include"


def _structures() -> List[Tuple[str, Type[ctypes.Structure]]]:
    """Every ``Wps*`` structure of the binding, with its C name (``WpsAckRecord`` is
    ``wps_ack_record``)."""
    found = []
    for name, value in vars(native).items():
        if name.startswith("Wps") and isinstance(value, type) and issubclass(value, ctypes.Structure):
            found.append((re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(), value))
    return found


def _c_layout(structures: List[Tuple[str, Type[ctypes.Structure]]], tmp: Path) -> Dict[str, int]:
    """``sizeof`` of each structure and ``offsetof`` of each of its ctypes fields, as the
    C compiler computes them from the header (keys ``name`` and ``name.field``)."""
    compiler = shutil.which("cc")
    assert compiler, "no C compiler (cc) on PATH: the layout test needs one"
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "webpubsub_client.h"', "int main(void) {"]
    for c_name, struct in structures:
        lines.append(f'    printf("{c_name} %zu\\n", sizeof(struct {c_name}));')
        for field in struct._fields_:
            lines.append(f'    printf("{c_name}.{field[0]} %zu\\n", offsetof(struct {c_name}, {field[0]}));')
    lines += ["    return 0;", "}"]
    source = tmp / "layout.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp / "layout"
    subprocess.run([compiler, "-I", str(HEADER_DIR), "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


def _header_fields(c_name: str) -> List[str]:
    """The field names of ``struct c_name`` in the header, in order."""
    header = (HEADER_DIR / "webpubsub_client.h").read_text()
    body = re.search(r"typedef struct " + c_name + r" \{(.*?)\n\} " + c_name + ";", header, re.S)
    assert body, f"struct {c_name} not found in the header"
    without_comments = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    return [re.findall(r"(\w+)(?:\[\w*\])?;", line)[0] for line in without_comments.splitlines() if ";" in line]


def test_every_ctypes_structure_has_the_c_layout(tmp_path: Path) -> None:
    structures = _structures()
    assert len(structures) >= 6, [name for name, _ in structures]
    layout = _c_layout(structures, tmp_path)
    for c_name, struct in structures:
        assert [field[0] for field in struct._fields_] == _header_fields(c_name), c_name
        assert ctypes.sizeof(struct) == layout[c_name], c_name
        for field in struct._fields_:
            assert getattr(struct, field[0]).offset == layout[f"{c_name}.{field[0]}"], f"{c_name}.{field[0]}"
