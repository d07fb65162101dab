"""Read an offline W&B run's history back from its ``run-<id>.wandb`` file.

wandb keeps an offline run only in that file: a LevelDB-style log (a 7-byte header ``:W&B`` + magic + version,
then 32 KiB blocks of chunks: 4-byte checksum, 2-byte length, 1-byte type full/first/middle/last) of
``wandb_internal_pb2.Record`` messages. wandb no longer ships a reader for it, so the tests use this one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
            pending = b""
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def history(path: Path) -> list[dict]:
    """Every logged row, as {key: value}, in order (``_step`` included)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's config as last updated."""
    return _as_last_updated(path, "config")


def summary(path: Path) -> dict:
    """The run's summary as last updated."""
    return _as_last_updated(path, "summary")


def _as_last_updated(path: Path, kind: str) -> dict:
    out = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == kind:
            for item in getattr(record, kind).update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def run_record(path: Path) -> wandb_internal_pb2.RunRecord:
    """The run's identity: run_id, display_name, run_group, ..."""
    return next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")


def run_id(path: Path) -> str:
    return run_record(path).run_id
