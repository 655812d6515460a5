"""Weights files are untrusted: real hostile files, built here with torch in every container torch
has produced, are refused with one line naming the file (and the offending global), run no code,
and cannot crash or hang the process. Valid files in every layout and dtype load exactly.

Every load runs in a child process (tests/_isolation.py): a payload that ran, a SIGSEGV from a
view past its storage, or a hang is recorded as that case's outcome, never taken down pytest.
"""

from __future__ import annotations

import atexit
import collections
import functools
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _isolation import run_cases  # noqa: E402

MARKER = "PAYLOAD_RAN"

# ------------------------------------------------------------------------------ payloads


class _Reduce:
    """An object whose unpickling calls `func(*args)`: what a hostile checkpoint carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os_system": _Reduce(os.system, f"touch '{marker}'"),  # pickled as posix.system
        "exec": _Reduce(exec, touch),
        "eval": _Reduce(eval, touch),
        "subprocess": _Reduce(subprocess.call, ["touch", str(marker)]),
        "popen": _Reduce(os.popen, f"touch '{marker}'"),
    }


def _stack_global_payload(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL with a dotted name (os.system reached as `os` . `system`)."""
    cmd = f"touch '{marker}'".encode()
    return (
        b"\x80\x04"
        + b"\x8c\x02os" + b"\x8c\x06system" + b"\x93"  # SHORT_BINUNICODE x2, STACK_GLOBAL
        + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


def _getattr_payload(marker: Path) -> bytes:
    """builtins.getattr(builtins.__import__('os'), 'system')(cmd), protocol 2."""
    cmd = f"touch '{marker}'".encode()
    text = lambda s: b"X" + struct.pack("<I", len(s)) + s  # noqa: E731  BINUNICODE
    return (
        b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n(" + text(b"os") + b"tR" + text(b"system")
        + b"tR(" + text(cmd) + b"tR."
    )


# ----------------------------------------------------------------------- torch containers


def _state_dict():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).state_dict()  # weight (2, 3), bias (2,)


def _torch_fc(extra: dict | None = None) -> dict:
    return {"fc." + k: v for k, v in _state_dict().items()} | (extra or {})


def _save(obj, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _pickles(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first `count` pickles of a legacy stream (parsed, not run) and the bytes after them."""
    f, parts = io.BytesIO(data), []
    for _ in range(count):
        start = f.tell()
        for _ in pickletools.genops(f):
            pass
        parts.append(data[start : f.tell()])
    return parts, data[f.tell() :]


_LEGACY_PARTS = ("magic", "protocol", "sys_info", "object", "storage_keys")


def _replace_legacy_pickle(source: Path, path: Path, part: str, payload: bytes) -> Path:
    parts, rest = _pickles(source.read_bytes(), 5)
    parts[_LEGACY_PARTS.index(part)] = payload
    path.write_bytes(b"".join(parts) + rest)
    return path


def _rewrite_zip(source: Path, path: Path, replace: dict[str, bytes], compress: dict[str, int] | None = None) -> Path:
    """A copy of torch's zip archive `source` with members replaced or added (by name suffix)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0] + "/"
        names = [i.filename for i in zin.infolist()]
        for name in names:
            suffix = name[len(root) :]
            data = replace.pop(suffix) if suffix in replace else zin.read(name)
            zout.writestr(name, data, compress_type=(compress or {}).get(suffix, zipfile.ZIP_STORED))
        for suffix, data in replace.items():
            zout.writestr(root + suffix, data, compress_type=(compress or {}).get(suffix, zipfile.ZIP_STORED))
    return path


# --------------------------------------------------------------- crafted tensor pickles


class _Storage:
    def __init__(self, key: str, numel: int, kind: str = "FloatStorage", view=None):
        self.key, self.numel, self.kind, self.view = key, numel, kind, view


class _Tensor:
    def __init__(self, storage: _Storage, offset, size, stride):
        self.args = (storage, offset, tuple(size) if isinstance(size, list) else size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


class _CraftPickler(pickle.Pickler):
    """Pickles `_Storage` as torch does: a persistent id naming the storage type and key."""

    def __init__(self, f, legacy: bool, pid=None):
        super().__init__(f, protocol=2)
        self.legacy, self.pid = legacy, pid

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        if self.pid is not None:
            return self.pid
        kind = getattr(torch, obj.kind) if isinstance(obj.kind, str) else obj.kind
        record = ("storage", kind, obj.key, "cpu", obj.numel)
        return record + (obj.view,) if self.legacy else record


def _craft_pickle(obj, legacy: bool, pid=None) -> bytes:
    f = io.BytesIO()
    _CraftPickler(f, legacy, pid).dump(obj)
    return f.getvalue()


def _fc(weight: _Tensor, bias: _Tensor | None = None) -> dict:
    storage = weight.args[0]
    return {"fc.weight": weight, "fc.bias": bias or _Tensor(storage, 0, (2,), (1,))}


def _craft_zip(template: Path, path: Path, obj, storages: dict[str, bytes], pid=None) -> Path:
    replace = {"data.pkl": _craft_pickle(obj, False, pid)} | {f"data/{k}": v for k, v in storages.items()}
    with zipfile.ZipFile(template) as z:  # drop the template's own storages
        root = z.namelist()[0].split("/")[0] + "/"
        keep = {n[len(root) :] for n in z.namelist() if "/data/" not in n}
    with zipfile.ZipFile(template) as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            suffix = name[len(root) :]
            if suffix in keep:
                zout.writestr(name, replace.pop(suffix, None) or zin.read(name))
        for suffix, data in replace.items():
            zout.writestr(root + suffix, data)
    return path


def _craft_legacy(template: Path, path: Path, obj, storages: dict[str, bytes], itemsize: int = 4,
                  counts: dict[str, int] | None = None, pid=None) -> Path:
    parts, _ = _pickles(template.read_bytes(), 3)  # torch's own magic, protocol, sys_info
    body = b"".join(
        struct.pack("<q", (counts or {}).get(k, len(v) // itemsize)) + v for k, v in storages.items()
    )
    path.write_bytes(b"".join(parts) + _craft_pickle(obj, True, pid) + pickle.dumps(list(storages), 2) + body)
    return path


FLOATS = np.arange(8, dtype=np.float32).tobytes()  # a storage of 8 float32 values


# ------------------------------------------------------------------------------- the corpus


def _cases(d: Path) -> list[tuple[str, Path, str]]:
    """(id, file, expectation): "loads" or a regular expression the WeightsError must match."""
    zip_ok = _save(_torch_fc(), d / "ok.pth")
    legacy_ok = _save(_torch_fc(), d / "ok_legacy.pth", legacy=True)
    cases = [("valid-zip", zip_ok, "loads"), ("valid-legacy", legacy_ok, "loads")]

    # Code-execution payloads, in every container; each case's payload would create its own marker.
    glob = (  # protocol 2 writes Python 2 names: __builtin__.exec, commands.call (subprocess.call)
        r"references the Python global (posix|builtins|__builtin__|subprocess|commands|os)\.(system|exec|eval|call|popen)"
    )
    tensor = _Tensor(_Storage("0", 8), 0, (2, 3), (3, 1))

    def tar(path: Path, blob: bytes) -> Path:
        with tarfile.open(path, "w") as archive:  # torch < 1.0's container
            info = tarfile.TarInfo("pickle")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
        return path

    def legacy_part(part: str):
        return lambda path, p: _replace_legacy_pickle(legacy_ok, path, part, pickle.dumps(p, 2))

    containers = {  # name -> (build(path, payload), what the error must say)
        "zip": (lambda path, p: _save(_torch_fc({"extra": p}), path), glob),
        "zip-only": (lambda path, p: _save(p, path), glob),
        "zip-wrapped": (lambda path, p: _save({"state_dict": _torch_fc(), "args": p}, path), glob),
        "zip-in-storage-type": (
            lambda path, p: _craft_zip(zip_ok, path, _fc(tensor), {"0": FLOATS}, pid=("storage", p, "0", "cpu", 8)),
            glob,
        ),
        "legacy-torch.save": (lambda path, p: _save(_torch_fc({"extra": p}), path, legacy=True), glob),
        **{f"legacy-{part}": (legacy_part(part), glob) for part in _LEGACY_PARTS},
        "legacy-in-storage-key": (
            lambda path, p: _craft_legacy(
                legacy_ok, path, _fc(tensor), {"0": FLOATS}, pid=("storage", torch.FloatStorage, p, "cpu", 8, None)
            ),
            glob,
        ),
        "raw-pickle-p2": (lambda path, p: _write(path, pickle.dumps(p, 2)), glob),
        "raw-pickle-p4": (lambda path, p: _write(path, pickle.dumps(p, 4)), glob),
        "raw-pickle-p0": (lambda path, p: _write(path, pickle.dumps(p, 0)), "not a torch checkpoint"),
        "tar": (lambda path, p: tar(path, pickle.dumps(p, 2)), "tar archive"),
        "zip-named-safetensors": (
            lambda path, p: _write(path.with_suffix(".safetensors"), _save(p, path).read_bytes()),
            "not a valid safetensors file",
        ),
    }
    for name in ("os_system", "exec", "eval", "subprocess", "popen"):
        for container, (build, expected) in containers.items():
            case = f"{name}-{container}"
            cases.append((case, build(d / f"{case}.pth", _payloads(d / f"{MARKER}-{case}")[name]), expected))
    hand_made = {"stack-global": _stack_global_payload, "getattr-import": _getattr_payload}
    for name, payload in hand_made.items():
        expected = r"global (os\.system|builtins\.getattr)"
        for container, build in {
            "zip": lambda path, blob: _rewrite_zip(zip_ok, path, {"data.pkl": blob}),
            "legacy-object": lambda path, blob: _replace_legacy_pickle(legacy_ok, path, "object", blob),
            "legacy-magic": lambda path, blob: _replace_legacy_pickle(legacy_ok, path, "magic", blob),
        }.items():
            case = f"{name}-{container}"
            cases.append((case, build(d / f"{case}.pth", payload(d / f"{MARKER}-{case}")), expected))
    # A whole pickled module, not a state_dict: refused by the class it names.
    model = torch.nn.Linear(3, 2)
    cases += [
        ("whole-module-zip", _save(model, d / "module.pth"), r"global torch\.nn\.modules\.linear\.Linear"),
        ("whole-module-legacy", _save(model, d / "module_l.pth", legacy=True), r"global torch\.nn\.modules"),
    ]

    # Views that lie about their storage (8 float32 values).
    views = {
        "stride-past-storage": ((4096, 4096), (1 << 20, 1), 0),
        "size-past-storage": ((3, 3), (3, 1), 0),
        "offset-past-storage": ((2, 3), (3, 1), 1 << 40),
        "offset-at-end": ((2, 3), (3, 1), 8),
        "negative-stride": ((2, 3), (-3, 1), 7),
        "negative-offset": ((2, 3), (3, 1), -4),
        "negative-size": ((-2, 3), (3, 1), 0),
        "huge-size-zero-stride": ((1 << 30, 1 << 30), (0, 0), 0),
        "rank-mismatch": ((2, 3), (1,), 0),
        "non-integer-size": (("2", 3), (3, 1), 0),
        "float-stride": ((2, 3), (3.0, 1), 0),
        "bool-offset": ((2, 3), (3, 1), True),
        "too-many-dims": ((1,) * 40, (1,) * 40, 0),
    }
    for name, (size, stride, offset) in views.items():
        weight = _Tensor(_Storage("0", 8), offset, size, stride)
        why = r"reaches element|negative|must be integers|do not match|would take|storage record|malformed"
        cases.append((f"{name}-zip", _craft_zip(zip_ok, d / f"{name}.pth", _fc(weight), {"0": FLOATS}), why))
        cases.append((f"{name}-legacy", _craft_legacy(legacy_ok, d / f"{name}_l.pth", _fc(weight), {"0": FLOATS}), why))
    good = _fc(_Tensor(_Storage("0", 8), 0, (2, 3), (3, 1)))
    cases += [
        ("crafted-valid-zip", _craft_zip(zip_ok, d / "crafted.pth", good, {"0": FLOATS}), "loads"),
        ("crafted-valid-legacy", _craft_legacy(legacy_ok, d / "crafted_l.pth", good, {"0": FLOATS}), "loads"),
        ("storage-missing-zip", _craft_zip(zip_ok, d / "nostorage.pth", good, {}), "not in the file"),
        ("storage-not-whole-items-zip", _craft_zip(zip_ok, d / "odd.pth", good, {"0": FLOATS[:-1]}), "not a whole number"),
        ("storage-type-not-storage", _craft_zip(zip_ok, d / "st.pth", _fc(_Tensor(_Storage("0", 8, collections.OrderedDict), 0, (2, 3), (3, 1))), {"0": FLOATS}), "storage type"),
        ("storage-type-tensor-class", _craft_zip(zip_ok, d / "st2.pth", _fc(_Tensor(_Storage("0", 8, "FloatTensor"), 0, (2, 3), (3, 1))), {"0": FLOATS}), r"global torch\.FloatTensor"),
        ("pid-not-a-tuple", _craft_zip(zip_ok, d / "pid1.pth", good, {"0": FLOATS}, pid="0"), "persistent id"),
        ("pid-module-record", _craft_zip(zip_ok, d / "pid2.pth", good, {"0": FLOATS}, pid=("module", int, "src", "src")), r"global __builtin__\.long"),
        ("pid-negative-numel", _craft_zip(zip_ok, d / "pid3.pth", good, {"0": FLOATS}, pid=("storage", torch.FloatStorage, "0", "cpu", -1)), "malformed storage"),
        ("pid-key-is-a-list", _craft_zip(zip_ok, d / "pid4.pth", good, {"0": FLOATS}, pid=("storage", torch.FloatStorage, ["0"], "cpu", 8)), "malformed storage"),
        ("legacy-storage-view", _craft_legacy(legacy_ok, d / "view.pth", _fc(_Tensor(_Storage("0", 8, view=("1", 0, 4)), 0, (2, 3), (3, 1))), {"0": FLOATS}), "storage views"),
        ("legacy-huge-element-count", _craft_legacy(legacy_ok, d / "numel.pth", good, {"0": FLOATS}, counts={"0": 1 << 60}), "declares .* elements"),
        ("legacy-negative-element-count", _craft_legacy(legacy_ok, d / "numel2.pth", good, {"0": FLOATS}, counts={"0": -5}), "declares .* elements"),
        ("legacy-count-past-end", _craft_legacy(legacy_ok, d / "numel3.pth", good, {"0": FLOATS}, counts={"0": 9}), "declares .* elements"),
        ("legacy-unknown-storage-key", _write(d / "keys.pth", b"".join(_pickles(legacy_ok.read_bytes(), 4)[0]) + pickle.dumps(["nope"], 2)), "unknown or repeated"),
    ]

    # Pickles that declare more than they hold, or build something odd.
    big_bytes = b"\x80\x02\x8e" + struct.pack("<Q", 1 << 40) + b"abc"  # BINBYTES8 of 1 TiB
    huge_memo = b"\x80\x02}r" + struct.pack("<I", 1 << 31) + b"."  # LONG_BINPUT 2**31
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # 200000 nested lists
    tensor_then_build = _craft_pickle(_Tensor(_Storage("0", 8), 0, (2, 3), (3, 1)), False)[:-1] + b"}X\x06\x00\x00\x00strideK\x00sb."
    rebuild_from_type = (
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)}tR."
    )
    # BUILD on an allow-listed function: with slot state it would set _rebuild_tensor.__defaults__,
    # with dict state its __dict__ -- changes that would outlive the load.
    build_slots = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    build_dict = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00xK\x01sb."
    encode_other_codec = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00rot_13\x86R."
    for name, blob, why in [
        ("binbytes8-1TiB", big_bytes, "truncated or malformed"),
        ("memo-index-2e31", huge_memo, "memo index"),
        ("deep-nesting", deep, "malformed|RecursionError|nest"),
        ("build-on-tensor", tensor_then_build, "malformed"),
        ("rebuild-from-type-other-func", rebuild_from_type, "malformed"),
        ("codecs-encode-other-codec", encode_other_codec, "malformed"),
        ("build-slots-on-global", build_slots, "cannot modify"),
        ("build-dict-on-global", build_dict, "cannot modify"),
        ("empty-pickle", b"", "truncated or malformed"),
        ("garbage-pickle", b"\x80\x02\xff\xfe", "truncated or malformed"),
    ]:
        cases.append((f"{name}-zip", _rewrite_zip(zip_ok, d / f"{name}.pth", {"data.pkl": blob}), why))
        cases.append((f"{name}-legacy", _replace_legacy_pickle(legacy_ok, d / f"{name}_l.pth", "object", blob), why))

    # Damaged containers.
    data = zip_ok.read_bytes()
    legacy = legacy_ok.read_bytes()
    bomb = d / "bomb.pth"
    _rewrite_zip(zip_ok, bomb, {"data/1": bytes(256 << 20)}, compress={"data/1": zipfile.ZIP_DEFLATED})
    lying = bytearray(data)
    central = lying.rfind(b"PK\x01\x02")  # the last member's central-directory record: claim 1 TiB
    lying[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)
    cases += [
        ("zip-bomb-member", bomb, "declare more bytes"),
        ("zip-lying-member-size", _write(d / "lying.pth", bytes(lying)), "declare more bytes|cannot read"),
        ("zip-truncated-half", _write(d / "trunc.pth", data[: len(data) // 2]), "truncated or corrupt zip"),
        ("zip-truncated-tail", _write(d / "trunc2.pth", data[:-10]), "truncated or corrupt zip|cannot read"),
        ("zip-two-data-pkl", _rewrite_zip(zip_ok, d / "two.pth", {"other/data.pkl": b"\x80\x02}."}), "2 data.pkl"),
        ("zip-no-data-pkl", _write_zip(d / "nopkl.pth", {"a/b": b"x"}), "0 data.pkl"),
        ("zip-big-endian", _rewrite_zip(zip_ok, d / "be.pth", {"byteorder": b"big"}), "big-endian"),
        ("zip-corrupt-crc", _write(d / "crc.pth", _flip_storage_byte(data)), "cannot read|CRC"),
        ("legacy-truncated-in-pickle", _write(d / "lt1.pth", legacy[:200]), "truncated or malformed"),
        ("legacy-truncated-in-storage", _write(d / "lt2.pth", legacy[:-3]), "declares .* elements|truncated"),
        ("legacy-truncated-before-storage", _write(d / "lt3.pth", legacy[: len(b"".join(_pickles(legacy, 5)[0])) + 4]), "truncated"),
        ("legacy-big-endian", _replace_legacy_pickle(legacy_ok, d / "lbe.pth", "sys_info", pickle.dumps({"little_endian": False}, 2)), "big-endian"),
        ("legacy-bad-magic", _replace_legacy_pickle(legacy_ok, d / "lm.pth", "magic", pickle.dumps(12345, 2)), "bad magic"),
        ("legacy-sys-info-list", _replace_legacy_pickle(legacy_ok, d / "lsi.pth", "sys_info", pickle.dumps([1], 2)), "malformed system info"),
        ("legacy-keys-not-list", _replace_legacy_pickle(legacy_ok, d / "lk.pth", "storage_keys", pickle.dumps({"a": 1}, 2)), "malformed storage key"),
        ("empty-file", _write(d / "empty.pth", b""), "empty"),
        ("random-bytes", _write(d / "random.pth", np.random.default_rng(0).bytes(4096)), "not a torch checkpoint"),
        ("text-file", _write(d / "text.pth", b"hello\n"), "not a torch checkpoint"),
    ]

    # dtypes: float types convert with a warning, others are refused naming the key.
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        state = {k: v.to(dtype) for k, v in _torch_fc().items()}
        cases.append((f"dtype-{dtype}-zip", _save(state, d / f"{dtype}.pth"), "loads"))
        cases.append((f"dtype-{dtype}-legacy", _save(state, d / f"{dtype}_l.pth", legacy=True), "loads"))
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        state = _torch_fc() | {"fc.weight": torch.ones(2, 3, dtype=dtype)}
        cases.append((f"dtype-{dtype}-refused", _save(state, d / f"{dtype}.pth"), r"wrong dtypes: fc\.weight is"))
    overflow = _torch_fc() | {"fc.bias": torch.tensor([1e300, 0.0], dtype=torch.float64)}
    cases.append(("dtype-float64-overflow", _save(overflow, d / "overflow.pth"), r"fc\.bias has float64 values beyond"))
    cases.append(("non-string-keys", _save({1: torch.ones(2)}, d / "intkeys.pth"), "is not a string"))
    cases += _safetensors_cases(d)
    return cases


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _flip_storage_byte(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        offset = next(i for i in z.infolist() if i.filename.endswith("data/0")).header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])  # the local header's
    position = offset + 30 + name_length + extra_length + 2
    corrupt = bytearray(data)
    corrupt[position] ^= 0xFF
    return bytes(corrupt)


# ------------------------------------------------------------------------------ safetensors


def _st(header, data: bytes = b"", length: int | None = None) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _safetensors_cases(d: Path) -> list[tuple[str, Path, str]]:
    weight, bias = np.arange(6, dtype=np.float32).tobytes(), np.ones(2, np.float32).tobytes()

    def entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
        return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}

    ok = {"fc.weight": entry(), "fc.bias": entry(shape=(2,), offsets=(24, 32))}
    data = weight + bias
    bad = "not a valid safetensors file"
    raw = {
        "valid": (_st(ok, data), "loads"),
        "valid-padded-header": (_st(json.dumps(ok).encode() + b"    ", data), "loads"),
        "header-length-2e63": (_st(ok, data, length=1 << 63), bad + ".*header length"),
        "header-length-past-end": (_st(ok, data, length=10_000), bad + ".*header length"),
        "header-length-zero": (_st(b"", data), bad),
        "shorter-than-8-bytes": (b"\x10\x00\x00", bad + ".*shorter"),
        "empty": (b"", bad + ".*shorter"),
        "header-not-json": (_st(b"{not json", data), bad),
        "header-not-utf8": (_st(b'{"\xff\xfe": 1}', data), bad),
        "header-a-list": (_st([1, 2], data), bad + ".*not an object"),
        "header-a-number": (_st(b"7", data), bad + ".*not an object"),
        "metadata-a-list": (_st({"__metadata__": [1], **ok}, data), bad + ".*__metadata__"),
        "metadata-values-not-strings": (_st({"__metadata__": {"format": 3}, **ok}, data), bad + ".*__metadata__"),
        "entry-not-an-object": (_st({"fc.weight": [0, 24], "fc.bias": entry(shape=(2,), offsets=(24, 32))}, data), bad + ".*expected dtype"),
        "entry-missing-offsets": (_st({"fc.weight": {"dtype": "F32", "shape": [2, 3]}}, weight), bad + ".*expected dtype"),
        "entry-extra-key": (_st({"fc.weight": {**entry(), "code": "x"}, "fc.bias": entry(shape=(2,), offsets=(24, 32))}, data), bad + ".*expected dtype"),
        "dtype-unknown": (_st({**ok, "fc.weight": entry(dtype="F8_E4M3")}, data), bad + ".*dtype 'F8_E4M3'"),
        "dtype-not-a-string": (_st({**ok, "fc.weight": entry(dtype=7)}, data), bad + ".*dtype"),
        "shape-negative": (_st({**ok, "fc.weight": entry(shape=(-2, -3))}, data), bad + ".*shape"),
        "shape-huge": (_st({**ok, "fc.weight": entry(shape=(1 << 62, 1 << 62))}, data), bad + ".*does not take"),
        "shape-not-a-list": (_st({**ok, "fc.weight": {**entry(), "shape": "2x3"}}, data), bad + ".*shape"),
        "shape-floats": (_st({**ok, "fc.weight": {**entry(), "shape": [2.0, 3.0]}}, data), bad + ".*shape"),
        "offsets-past-end": (_st({**ok, "fc.bias": entry(shape=(2,), offsets=(24, 4096))}, data), bad),
        "offsets-huge": (_st({**ok, "fc.bias": entry(shape=(2,), offsets=(1 << 62, (1 << 62) + 8))}, data), bad),
        "offsets-negative": (_st({**ok, "fc.weight": entry(offsets=(-24, 0))}, data), bad + ".*data_offsets"),
        "offsets-reversed": (_st({**ok, "fc.weight": entry(offsets=(24, 0))}, data), bad),
        "offsets-overlap": (_st({"fc.weight": entry(), "fc.bias": entry(shape=(2,), offsets=(16, 24))}, data[:24]), bad + ".*overlap"),
        "offsets-gap": (_st({"fc.weight": entry(), "fc.bias": entry(shape=(2,), offsets=(28, 36))}, data + bytes(4)), bad + ".*overlap"),
        "offsets-one-element": (_st({**ok, "fc.weight": entry(offsets=[0])}, data), bad + ".*data_offsets"),
        "span-not-shape": (_st({"fc.weight": entry(offsets=(0, 20)), "fc.bias": entry(shape=(2,), offsets=(20, 28))}, data[:28]), bad + ".*does not take"),
        "trailing-bytes": (_st(ok, data + b"extra"), bad + ".*holds"),
        "truncated-data": (_st(ok, data[:-4]), bad),
        "duplicate-keys": (_st(b'{"fc.weight": ' + json.dumps(entry()).encode() + b', "fc.weight": ' + json.dumps(entry()).encode() + b"}", weight), bad + ".*duplicate"),
        "deep-json": (_st(b"[" * 100_000 + b"]" * 100_000, data), bad),
        "int64-weight": (_st({"fc.weight": entry(dtype="I64", offsets=(0, 48)), "fc.bias": entry(shape=(2,), offsets=(48, 56))}, np.ones(6, np.int64).tobytes() + bias), r"wrong dtypes: fc\.weight is int64"),
        "bool-weight": (_st({"fc.weight": entry(dtype="BOOL", offsets=(0, 6)), "fc.bias": entry(shape=(2,), offsets=(6, 14))}, bytes(6) + bias), r"wrong dtypes: fc\.weight is bool"),
        "f16-weight": (_st({"fc.weight": entry(dtype="F16", offsets=(0, 12)), "fc.bias": entry(shape=(2,), offsets=(12, 20))}, np.arange(6, dtype=np.float16).tobytes() + bias), "loads"),
    }
    return [(f"safetensors-{name}", _write(d / f"{name}.safetensors", blob), why) for name, (blob, why) in raw.items()]


# -------------------------------------------------------------------------------- the tests


@functools.cache
def _corpus() -> tuple[Path, dict[str, tuple[Path, str]]]:
    """The hostile files, built once per session (at collection, for the test ids)."""
    d = Path(tempfile.mkdtemp(prefix="jaxattr_hostile_weights_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    table = {}
    for name, path, expected in _cases(d):
        assert name not in table, name
        table[name] = (path, expected)
    return d, table


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    d, table = _corpus()
    results = run_cases([{"call": "load_weights", "args": [str(path)]} for path, _ in table.values()], d)
    return dict(zip(table, results))


def _expected_fc(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(kernel, bias) a valid case must load to, from torch's own tensors."""
    if name.startswith("crafted-valid"):
        return np.arange(6, dtype=np.float32).reshape(2, 3).T, np.arange(2, dtype=np.float32)
    if name.startswith(("valid-", "dtype-torch.")):
        state = _state_dict()
        dtype = getattr(torch, name.split("-")[1].split(".")[-1]) if name.startswith("dtype-") else torch.float32
        return state["weight"].to(dtype).float().numpy().T, state["bias"].to(dtype).float().numpy()
    if name == "safetensors-f16-weight":
        return np.arange(6, dtype=np.float32).reshape(2, 3).T, np.ones(2, np.float32)
    if name.startswith("safetensors-valid"):
        return np.arange(6, dtype=np.float32).reshape(2, 3).T, np.ones(2, np.float32)
    return None


@pytest.mark.parametrize("case", list(_corpus()[1]))
def test_hostile_weights_file(outcomes, case):
    d, table = _corpus()
    path, expected = table[case]
    result = outcomes[case]
    assert not (d / f"{MARKER}-{case}").exists(), "the payload ran"
    assert "crashed" not in result, f"the process died (status {result['crashed']}) loading {case}"
    assert "hung" not in result, f"loading {case} hung"
    if expected == "loads":
        assert result["ok"], result
        kernel, bias = _expected_fc(case)
        fc = result["value"]["fc"]
        assert fc["kernel"]["dtype"] == "float32" and fc["kernel"]["shape"] == [3, 2]
        np.testing.assert_array_equal(fc["kernel"]["values"], kernel.ravel())
        np.testing.assert_array_equal(fc["bias"]["values"], bias)
        converted = [w for w in result["warnings"] if "converted" in w]
        if "16" in case or "float64" in case:  # float16, bfloat16, float64 files
            assert len(converted) == 1 and str(path) in converted[0], result["warnings"]
        else:
            assert not converted, result["warnings"]
        return
    assert not result["ok"], f"{case} loaded: {result}"
    assert "WeightsError" in result["mro"], result
    message = result["message"]
    assert "\n" not in message and str(path) in message, message
    assert re.search(expected, message), f"{message!r} does not match {expected!r}"


def test_the_corpus_is_large_and_no_payload_ran(outcomes):
    d, table = _corpus()
    assert len(table) >= 150, len(table)
    assert sum("crashed" in r or "hung" in r for r in outcomes.values()) == 0
    assert not list(d.glob(f"{MARKER}*"))


def test_the_payloads_are_live(tmp_path):
    """The payloads do run when unpickled by plain pickle (in a child): the tests above would
    otherwise prove nothing."""
    blobs = {name: pickle.dumps(p, 2) for name, p in _payloads(tmp_path / "ran").items()}
    blobs["stack-global"] = _stack_global_payload(tmp_path / "ran")
    blobs["getattr-import"] = _getattr_payload(tmp_path / "ran")
    for name, blob in blobs.items():
        (tmp_path / "ran").unlink(missing_ok=True)
        subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=blob, check=True, timeout=60)
        assert (tmp_path / "ran").exists(), name
