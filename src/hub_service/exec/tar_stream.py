"""A small, strict, streaming reader of untrusted tar archives.

The Hub reads tenants' archives itself, so the reader must cost the same for
every archive of a given size: each 512-byte header is parsed in constant
time, pax records in one linear pass over a header capped before it is
buffered, GNU long names capped likewise, and member data passed through as
it arrives (nothing is spooled). Why not the stdlib ``tarfile``: its pax
parsing uses backtracking regular expressions (a 50 KiB all-digit pax header
held the GIL for seconds, a 67 KiB one took a GiB of memory), and it expands
GNU sparse members (a 10 KiB archive becomes 500 MB of zeros).

Taken: ustar and POSIX pax (GNU and POSIX magic), pax ``path`` and ``size``
(other keys are skipped, global headers ignored), GNU long names ('L').
Members: regular files and directories. Everything else -- links, devices,
fifos, sparse files in any of their encodings, multi-volume parts, long link
names -- is refused with ``InvalidField("data", ...)`` naming the member.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sandhub.errors import InvalidField, PayloadTooLarge, clip

BLOCK = 512
MAX_PAX_BYTES = 64 << 10
"""A pax extended header larger than this is refused before it is read (real
ones are a few hundred bytes: a long path and a few times)."""
MAX_LONGNAME_BYTES = 4 << 10
"""A GNU long name ('L') longer than this is refused (Linux's PATH_MAX)."""

FILE_TYPES = (b"0", b"\0")
DIR_TYPE = b"5"
PAX_TYPE = b"x"
GLOBAL_PAX_TYPE = b"g"
LONGNAME_TYPE = b"L"
REFUSED_TYPES = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
    b"6": "a fifo", b"7": "a contiguous file", b"S": "a GNU sparse file", b"K": "a GNU long link name",
    b"D": "a GNU dump directory", b"M": "a GNU multi-volume part", b"N": "an old GNU long name",
    b"V": "a GNU volume label",
}
POSIX_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"

Kind = Literal["file", "dir"]


@dataclass(frozen=True)
class Member:
    """A member's header; for a file, its data follows as ``bytes`` items."""

    name: str
    kind: Kind
    mode: int
    size: int


def _refuse(what: str) -> InvalidField:
    return InvalidField("data", what)


def _octal(field: bytes, *, what: str) -> int:
    """An octal number field (digits, then NUL or spaces); base-256 when its
    first byte has the high bit set (GNU, for sizes of 8 GiB and more)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] and field[0] & 0x80:
        raise _refuse(f"negative or malformed {what} in a tar header")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise _refuse(f"{what} is not an octal number in a tar header")
    return int(text, 8)


def _text(raw: bytes, *, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(f"{what} is not UTF-8: {clip(raw.decode('utf-8', 'replace'))}") from None


def _checksum_ok(block: bytes) -> bool:
    """The unsigned sum of the header with its checksum field as spaces, or
    the signed sum some old writers used."""
    stored = _octal(block[148:156], what="checksum")
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(rest)
    return stored == unsigned or stored == unsigned - 256 * sum(1 for b in rest if b > 127)


def parse_pax(data: bytes, *, member: str) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"``, in one linear pass; the keys we use
    (path, size), and a refusal for any sparse key."""
    found: dict[str, str] = {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:  # padding after the last record
            break
        space = data.find(b" ", pos, min(pos + 21, end))
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise _refuse(f"{member}: malformed pax record at byte {pos}")
        length = int(digits)
        stop = pos + length
        if length <= len(digits) + 1 or stop > end or data[stop - 1] != 0x0A:
            raise _refuse(f"{member}: malformed pax record at byte {pos}")
        key, eq, value = data[space + 1:stop - 1].partition(b"=")
        if not eq:
            raise _refuse(f"{member}: pax record without '=' at byte {pos}")
        if key.startswith(b"GNU.sparse."):
            raise _refuse(f"{member}: sparse files are not taken (pax key {clip(key.decode('utf-8', 'replace'))})")
        if key in (b"path", b"size"):
            found[key.decode()] = _text(value, what=f"{member}: pax {key.decode()}")
        pos = stop
    return found


class TarReader:
    """Push parser: ``feed`` the archive's bytes as they arrive, get back
    ``Member`` headers and the data of file members; ``close`` at the end.

    Work per call is linear in the bytes fed. ``max_size`` bounds every size
    field (a member can't be bigger than the whole upload may be);
    ``max_headers`` the headers of every kind (members, pax, long names), so
    an archive of nothing but tiny headers ends early too.
    """

    def __init__(self, *, max_size: int, max_headers: int) -> None:
        self._max_size = max_size
        self._max_headers = max_headers
        self._headers = 0
        self._buf = bytearray()
        self._need = BLOCK  # bytes wanted in _buf before _complete
        self._state: Literal["header", "pax", "global", "longname", "data", "skip", "end"] = "header"
        self._remaining = 0  # data bytes of the current member ("data") or bytes to skip ("skip")
        self._pad = 0  # padding after the data
        self._ext_size = 0  # the unpadded size of the pax header or long name being read
        self._pax: dict[str, str] = {}
        self._longname: str | None = None
        self._current = ""

    @property
    def ended(self) -> bool:
        return self._state == "end"

    def feed(self, data: bytes) -> Iterator[Member | bytes]:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._state == "end":
                return  # what follows the end marker (record padding) is ignored
            if self._state == "data":
                n = min(self._remaining, end - pos)
                yield bytes(view[pos:pos + n])
                pos += n
                self._remaining -= n
                if not self._remaining:
                    self._skip(self._pad)
                continue
            if self._state == "skip":
                n = min(self._remaining, end - pos)
                pos += n
                self._remaining -= n
                if not self._remaining:
                    self._skip(0)
                continue
            n = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos:pos + n]
            pos += n
            if len(self._buf) == self._need:
                block = bytes(self._buf)
                self._buf.clear()
                member = self._complete(block)
                if member is not None:
                    yield member

    def close(self) -> None:
        """At the end of the stream: a member cut short is refused; an archive
        that ends between members, with or without its end marker, is whole."""
        if self._state == "end" or (self._state == "header" and not self._buf and not self._pax
                                    and self._longname is None):
            return
        if not self._headers:
            raise _refuse("not an uncompressed ustar or pax tar archive (shorter than one 512-byte header)")
        raise _refuse(f"the archive is truncated{f' in {clip(self._current)}' if self._current else ''}")

    def _skip(self, n: int) -> None:
        if n:
            self._state, self._remaining = "skip", n
        else:
            self._state, self._need = "header", BLOCK

    # -- one complete block (or extended header) ------------------------------------------

    def _complete(self, block: bytes) -> Member | None:
        if self._state == "header":
            return self._header(block)
        text = block[:self._ext_size]
        if self._state == "pax":
            self._pax = parse_pax(text, member=self._current)
        elif self._state == "longname":
            self._longname = _text(text.split(b"\0", 1)[0], what="a GNU long name")
        elif self._state == "global":
            parse_pax(text, member="a pax global header")  # checked (sparse keys), then ignored
        self._state, self._need = "header", BLOCK
        return None

    def _extended(self, state: Literal["pax", "global", "longname"], size: int, cap: int, what: str) -> None:
        if size > cap:
            raise _refuse(f"{what} of {size} bytes (at most {cap} are taken)")
        if size == 0:
            return
        self._state, self._ext_size, self._need = state, size, -(-size // BLOCK) * BLOCK

    def _header(self, block: bytes) -> Member | None:
        if not any(block):
            # The end-of-archive marker (two zero blocks; one is taken as the end too).
            self._state = "end"
            return None
        self._headers += 1
        if self._headers > self._max_headers:
            raise PayloadTooLarge(f"more than {self._max_headers} tar headers in the archive",
                                  limit=self._max_headers)
        magic = block[257:265]
        if magic[:6] != b"ustar\0" and magic != GNU_MAGIC:
            raise _refuse("not an uncompressed ustar or pax tar archive (compressed archives are not taken)")
        if not _checksum_ok(block):
            raise _refuse(f"bad header checksum after {clip(self._current) or 'the start'}")
        name = self._name(block, posix=magic[:6] == b"ustar\0")
        self._current = name
        kind = block[156:157]
        size = _octal(block[124:136], what="size")
        if kind == PAX_TYPE:
            self._extended("pax", size, MAX_PAX_BYTES, "a pax header")
            return None
        if kind == GLOBAL_PAX_TYPE:
            self._extended("global", size, MAX_PAX_BYTES, "a pax global header")
            return None
        if kind == LONGNAME_TYPE:
            self._extended("longname", size, MAX_LONGNAME_BYTES, "a GNU long name")
            return None
        if kind in REFUSED_TYPES:
            raise _refuse(f"{clip(name)} is {REFUSED_TYPES[kind]}; only regular files and directories are taken")
        if kind not in FILE_TYPES and kind != DIR_TYPE:
            raise _refuse(f"{clip(name)}: member type {kind!r} is not taken; only regular files and directories")
        if "size" in self._pax:
            text = self._pax["size"]
            # ASCII digits only, and few: str.isdigit takes "²", which int() refuses,
            # and int() refuses more than 4,300 digits (both were INTERNAL).
            if not (text.isascii() and text.isdigit() and len(text) <= 20):
                raise _refuse(f"{clip(name)}: pax size is not a number of at most 20 digits")
            size = int(self._pax["size"])
        if size > self._max_size:
            raise _refuse(f"{clip(name)}: a size of {size} bytes is over the upload limit of {self._max_size}")
        mode = _octal(block[100:108], what="mode")
        self._pax, self._longname = {}, None
        self._pad = -size % BLOCK
        if size and kind == DIR_TYPE:
            self._skip(size + self._pad)
        elif size:
            self._state, self._remaining = "data", size
        return Member(name=name, kind="dir" if kind == DIR_TYPE else "file", mode=mode & 0o7777,
                      size=size if kind != DIR_TYPE else 0)

    def _name(self, block: bytes, *, posix: bool) -> str:
        if "path" in self._pax:
            return self._pax["path"]
        if self._longname is not None:
            return self._longname
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0] if posix else b""
        return _text(prefix + b"/" + name if prefix else name, what="a member name")
