"""The streaming tar reader against crafted archives: what it takes, what it
refuses, and that hostile headers cost linear time (no backtracking)."""

from __future__ import annotations

import io
import tarfile
import time

import pytest

from hub_service.exec.tar_stream import MAX_LONGNAME_BYTES, MAX_PAX_BYTES, Member, TarReader
from sandhub.errors import InvalidField, PayloadTooLarge

LIMIT = 1 << 30


def read(data: bytes, *, chunk: int = 7, max_size: int = LIMIT, max_headers: int = 1000) -> list[tuple[Member, bytes]]:
    """Every member with its data, the archive fed ``chunk`` bytes at a time."""
    reader = TarReader(max_size=max_size, max_headers=max_headers)
    out: list[tuple[Member, bytearray]] = []
    for i in range(0, len(data), chunk):
        for item in reader.feed(data[i:i + chunk]):
            if isinstance(item, Member):
                out.append((item, bytearray()))
            else:
                out[-1][1].extend(item)
    reader.close()
    return [(m, bytes(b)) for m, b in out]


def build(*members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as t:
        for m in members:
            info, body = m if isinstance(m, tuple) else (m, b"")
            info.size = len(body) if info.isfile() else 0
            t.addfile(info, io.BytesIO(body) if info.isfile() else None)
    return raw.getvalue()


def entry(name: str, body: bytes = b"", *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
        info.linkname = "/etc/passwd"
    return info, body


def header(name: bytes, *, kind: bytes, size: int, size_field: bytes | None = None, magic: bytes = b"ustar\x0000") -> bytes:
    """One raw 512-byte header with a right checksum, for what tarfile won't write."""
    block = bytearray(512)
    block[:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[156:157] = kind
    block[257:265] = magic
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_member(records: bytes, then: bytes = b"x") -> bytes:
    """A pax header carrying ``records`` raw, then a one-byte file."""
    return (header(b"././@PaxHeader", kind=b"x", size=len(records)) + padded(records)
            + header(b"f", kind=b"0", size=len(then)) + padded(then) + b"\0" * 1024)


def refused(data: bytes, *words: str, error: type[Exception] = InvalidField, **kw: int) -> str:
    with pytest.raises(error) as e:
        read(data, **kw)
    message = str(e.value)
    for w in words:
        assert w in message, message
    return message


def test_files_dirs_long_names_and_modes_come_through_in_any_chunking() -> None:
    long = "d/" + "x" * 200 + "/file.txt"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        name = long if fmt != tarfile.USTAR_FORMAT else "d/" + "x" * 120 + "/f.txt"  # ustar: prefix + name
        dir_info = tarfile.TarInfo("d")
        dir_info.type = tarfile.DIRTYPE
        data = build(dir_info, entry(name, b"hello", mode=0o640), entry("empty"), entry("big", b"z" * 5000), fmt=fmt)
        for chunk in (1, 511, 512, 513, 1 << 20):
            got = read(data, chunk=chunk)
            assert [(m.name, m.kind, m.size, b) for m, b in got] == [
                ("d/", "dir", 0, b""), (name, "file", 5, b"hello"), ("empty", "file", 0, b""),
                ("big", "file", 5000, b"z" * 5000)]
            assert got[1][0].mode == 0o640


def test_an_all_digit_pax_header_is_refused_in_linear_time() -> None:
    # The stdlib held the GIL for seconds on 50 KiB of digits (a backtracking regex).
    start = time.perf_counter()
    refused(pax_member(b"1" * (MAX_PAX_BYTES - 100)), "malformed pax record")
    assert time.perf_counter() - start < 1.0
    # The quadratic-memory one ("2 2 2 ... =", each record's key the rest of the header).
    refused(pax_member(b"2 " * 20000 + b"=\n"), "malformed pax record")


def test_a_pax_header_over_the_cap_is_refused_before_it_is_read() -> None:
    big = header(b"././@PaxHeader", kind=b"x", size=MAX_PAX_BYTES + 1)
    reader = TarReader(max_size=LIMIT, max_headers=10)
    with pytest.raises(InvalidField, match="pax header of 65537 bytes"):
        list(reader.feed(big))


def test_pax_path_and_size_are_taken_and_other_keys_ignored() -> None:
    def rec(kv: bytes) -> bytes:
        n = len(kv) + 2
        n += len(str(n + len(str(n))))
        return b"%d %s\n" % (n, kv)
    records = rec(b"path=p\xc3\xa4th") + rec(b"mtime=1.5") + rec(b"comment=" + b"c" * 300)
    got = read(pax_member(records, b"abc"))
    assert [(m.name, b) for m, b in got] == [("päth", b"abc")]


@pytest.mark.parametrize("key", [b"GNU.sparse.major=1", b"GNU.sparse.size=500000000", b"GNU.sparse.map=0,1"])
def test_pax_sparse_keys_are_refused(key: bytes) -> None:
    n = len(key) + 2
    n += len(str(n + len(str(n))))
    refused(pax_member(b"%d %s\n" % (n, key)), "sparse")


def test_gnu_sparse_members_are_refused() -> None:
    refused(header(b"sp.bin", kind=b"S", size=0, magic=b"ustar  \x00") + b"\0" * 1024, "sp.bin", "sparse")


def test_sparse_archives_written_by_gnu_tar_are_refused(tmp_path: object) -> None:
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("tar") is None:
        pytest.skip("no GNU tar on this host to write sparse archives")
    d = Path(str(tmp_path))
    with open(d / "sp.bin", "wb") as f:
        f.truncate(100 << 20)
        f.write(b"x")
    for fmt in ("gnu", "oldgnu", "pax"):
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(d / f"{fmt}.tar"), "-C", str(d), "sp.bin"],
                       check=True)
        refused((d / f"{fmt}.tar").read_bytes(), "sparse")


def test_bad_checksum_and_not_a_tar_are_refused() -> None:
    data = bytearray(build(entry("a", b"x")))
    data[0] ^= 1  # the name changes; the stored checksum doesn't
    refused(bytes(data), "checksum")
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as t:
        t.addfile(tarfile.TarInfo("empty"), io.BytesIO(b""))
    refused(gz.getvalue(), "not an uncompressed")


def test_truncated_archives_are_refused() -> None:
    data = build(entry("a", b"x" * 1000))
    refused(data[:100], "not an uncompressed")
    for cut in (512 + 10, 512 + 1000):
        refused(data[:cut], "truncated", "in a")
    # Ending between members without the end marker is a whole archive.
    assert [m.name for m, _ in read(data[:512 + 1024])] == ["a"]


def test_long_name_bomb_is_refused() -> None:
    refused(header(b"././@LongLink", kind=b"L", size=MAX_LONGNAME_BYTES + 1, magic=b"ustar  \x00"), "long name")
    refused(header(b"././@LongLink", kind=b"L", size=10 << 30, magic=b"ustar  \x00"), "long name")


def test_base256_sizes_are_read_and_bounded() -> None:
    size = 3 * 512
    field = b"\x80" + size.to_bytes(11, "big")
    data = header(b"b", kind=b"0", size=0, size_field=field) + b"y" * size + b"\0" * 1024
    assert [(m.size, len(b)) for m, b in read(data)] == [(size, size)]
    huge = b"\x80" + (1 << 40).to_bytes(11, "big")
    refused(header(b"b", kind=b"0", size=0, size_field=huge), "over the upload limit")
    refused(header(b"b", kind=b"0", size=0, size_field=b"\xff" * 12), "negative")
    refused(header(b"b", kind=b"0", size=0, size_field=b"12345678z\0\0\0"), "not an octal")


@pytest.mark.parametrize(("kind", "what"), [
    (tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "character device"),
    (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "fifo"),
])
def test_links_devices_and_fifos_are_refused_by_name(kind: bytes, what: str) -> None:
    refused(build(entry("ok", b"1"), entry("evil", kind=kind)), "evil", what)


def test_too_many_headers_are_refused() -> None:
    data = build(*(entry(f"f{i}") for i in range(20)))
    refused(data, "more than 10 tar headers", error=PayloadTooLarge, max_headers=10)


def test_traversal_names_come_through_for_the_uploader_to_refuse() -> None:
    # The reader reports names as written; check_path (uploader.py) refuses '..'.
    from hub_service.exec.uploader import check_path
    from sandhub.errors import PathNotAllowed

    got = read(build(entry("../../etc/passwd", b"x")))
    assert got[0][0].name == "../../etc/passwd"
    with pytest.raises(PathNotAllowed):
        check_path(got[0][0].name, field="data")


def test_non_utf8_names_are_refused() -> None:
    refused(header(b"caf\xe9", kind=b"0", size=0) + b"\0" * 1024, "not UTF-8")


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_a_pax_size_that_int_refuses_is_refused_not_internal() -> None:
    """Found in review: str.isdigit takes '²' and 5,000 digits, which int() refuses
    (ValueError, so INTERNAL with a traceback)."""
    for size in ("²", "1" * 5000, "٣"):
        refused(pax_member(pax_record("size", size)), "pax size is not a number")
