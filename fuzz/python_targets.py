"""Fuzz targets over scrimp's Python-side readers of outside data, for atheris (run_python_fuzz.py) and
for the regression replay in tests/python/test_fuzz_corpus.py.

Each target takes the raw bytes of one file. It must either succeed or raise one of the documented
errors (ValueError for malformed content); any other exception, or a crash of the interpreter, is a
finding. Targets:

* ``adapter_file`` - ``scrimp.packets.method.Adapters.load`` on a KV Packet adapter file (safetensors);
* ``tessy_jsonl`` - TESSY's resume path: ``read_records``/``latest_records``/``finished_ids``/``stats``/
  ``to_chat_records`` on a JSONL output file;
* ``packet_dir`` - a packet store reopening a directory that holds the bytes as a packet file
  (index rebuild, then ``get``): corrupt files are dropped and counted, never served.
"""
from __future__ import annotations

import os
import shutil
import tempfile

_TMP = None


def _scratch() -> str:
    global _TMP
    if _TMP is None:
        _TMP = tempfile.mkdtemp(prefix="scrimp-fuzz-")
    return _TMP


def adapter_file(data: bytes) -> None:
    from scrimp.packets.method import Adapters

    path = os.path.join(_scratch(), "adapters.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    try:
        a = Adapters.load(path)
    except ValueError:
        return
    # accepted: a usable adapter pair
    assert a.header.shape[0] == 1 and a.header.shape[2] == a.trailer.shape[2]
    assert a.fingerprint


def tessy_jsonl(data: bytes) -> None:
    from scrimp.tessy import output

    path = os.path.join(_scratch(), "out.jsonl")
    with open(path, "wb") as f:
        f.write(data)
    recs = list(output.read_records(path, warn=False))
    assert all(isinstance(r, dict) for r in recs)
    latest = output.latest_records(path)
    assert all(output.record_problem(r) is None for r in latest.values())
    assert set(output.finished_ids(path)) == set(latest)
    s = output.stats(path)
    assert s["records"] == len(latest) and 0 <= s["ok"] <= s["records"]
    output.format_stats(s)
    output.to_chat_records(latest.values())


def packet_dir(data: bytes) -> None:
    import scrimp

    d = os.path.join(_scratch(), "store")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    # the store only indexes files named after the key they hold: name it after the key bytes
    name = (data[28:60].hex() if len(data) >= 60 else "ab" * 32) + ".kvp"
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    store = scrimp.PacketStore(path=d, host_bytes=1 << 20, fsync=False, verify_on_open=True)
    for key in store.keys():
        p = store.get(key)
        if p is not None:
            p.release()
    st = store.stats()
    assert st["packets"] + st["corrupt_files"] <= 1


TARGETS = {"adapter_file": adapter_file, "tessy_jsonl": tessy_jsonl, "packet_dir": packet_dir}
