"""A minimal reader for R's serialization format (XDR, versions 2 and 3), enough to read the
character vectors and data frames that an R package's lazy-load data base (data/Rdata.rdb with
its index Rdata.rdx) holds. Pure Python, no R needed.

R objects map to Python as: character/integer/double/logical vectors -> lists (NA -> None),
lists -> RList (a list with .attrs), pairlists -> list of (tag, value), NULL -> None.
"""

import bz2
import gzip
import lzma
import struct
import zlib


class RList(list):
    """A generic vector (R list); attributes such as names/class are in .attrs."""

    attrs = None


class RVector(list):
    """An atomic vector with attributes (e.g. a factor's levels)."""

    attrs = None


NA_INT = -2147483648


class _Reader:
    def __init__(self, data):
        self.d = data
        self.p = 0
        self.refs = []

    def raw(self, n):
        b = self.d[self.p:self.p + n]
        if len(b) != n:
            raise ValueError("truncated R serialization")
        self.p += n
        return b

    def int(self):
        return struct.unpack(">i", self.raw(4))[0]

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        fmt = self.raw(2)
        if fmt != b"X\n":
            raise ValueError(f"unsupported R serialization format {fmt!r} (only XDR)")
        version = self.int()
        self.int()  # writer version
        self.int()  # minimal reader version
        if version == 3:
            self.raw(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def attributes(self, has_attr):
        if not has_attr:
            return None
        return dict((tag, val) for tag, val in self.item())

    def charsxp(self, flags):
        n = self.int()
        if n == -1:
            return None
        s = self.raw(n)
        # Bit 3 of the levels marks UTF-8, bit 2 Latin-1; ASCII/native are decoded as UTF-8.
        levels = flags >> 12
        return s.decode("latin-1" if levels & 4 and not levels & 8 else "utf-8")

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE
            return None
        if t in (253, 252, 251, 250, 242, 241):  # environments and markers
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t in (247, 248, 249):  # PERSIST, PACKAGE, NAMESPACE: a string vector
            self.int()
            n = self.int()
            val = [self.item() for _ in range(n)]
            self.refs.append(val)
            return val
        if t == 1:  # SYMSXP
            val = self.item()
            self.refs.append(val)
            return val
        if t in (2, 6, 3, 5, 17, 239, 240):  # pairlist-like
            out = []
            while True:
                attrs = self.attributes(has_attr)
                tag = self.item() if has_tag else None
                car = self.item()
                out.append((tag, car))
                del attrs
                nxt = self.int()
                nt = nxt & 0xFF
                if nt not in (2, 6, 3, 5, 17, 239, 240):
                    self.p -= 4
                    self.item()  # cdr that is not a pairlist (normally NIL)
                    break
                has_attr = bool(nxt & (1 << 9))
                has_tag = bool(nxt & (1 << 10))
            return out
        if t == 4:  # ENVSXP
            self.int()  # locked
            env = {}
            self.refs.append(env)
            self.item()  # enclosure
            frame = self.item()
            hashtab = self.item()
            self.item()  # attributes
            for tag, val in (frame or []):
                env[tag] = val
            for bucket in (hashtab or []):
                for tag, val in (bucket or []):
                    env[tag] = val
            return env
        if t == 9:
            return self.charsxp(flags)
        if t in (10, 13):  # logical, integer
            n = self.length()
            vals = struct.unpack(f">{n}i", self.raw(4 * n))
            val = RVector(None if v == NA_INT else v for v in vals)
        elif t == 14:  # double
            n = self.length()
            val = RVector(struct.unpack(f">{n}d", self.raw(8 * n)))
        elif t == 16:  # character
            n = self.length()
            val = RVector(self.item() for _ in range(n))
        elif t in (19, 20):  # list, expression
            n = self.length()
            val = RList(self.item() for _ in range(n))
        elif t == 24:  # raw
            val = RVector(self.raw(self.length()))
        elif t == 238:  # ALTREP
            info = self.item()
            state = self.item()
            self.item()  # attributes
            cls = info[0][1] if info else None
            if cls == "compact_intseq":
                n, start, step = state
                return RVector(int(start + i * step) for i in range(int(n)))
            if cls == "compact_realseq":
                n, start, step = state
                return RVector(start + i * step for i in range(int(n)))
            if cls and cls.startswith("wrap_"):
                return state[0]
            if cls == "deferred_string":
                return RVector(str(v) for v in state[0][1])
            raise ValueError(f"unsupported ALTREP class {cls!r}")
        else:
            raise ValueError(f"unsupported R type {t}")
        val.attrs = self.attributes(has_attr)
        return val


def unserialize(data):
    r = _Reader(data)
    r.header()
    return r.item()


def read_rds(path):
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return unserialize(raw)


def _names(obj):
    return list(obj.attrs.get("names", [])) if obj.attrs else []


def read_lazyload(rdb_path, rdx_path):
    """All objects of an R lazy-load data base, by name."""
    index = read_rds(rdx_path)
    fields = dict(zip(_names(index), index))
    variables = fields["variables"]
    blob = open(rdb_path, "rb").read()
    out = {}
    for name, (offset, size) in zip(_names(variables), variables):
        chunk = blob[int(offset):int(offset) + int(size)]
        kind = chunk[4:5]
        if kind == b"Z":
            data = zlib.decompress(chunk[5:])
        elif kind == b"2":
            data = bz2.decompress(chunk[5:])
        elif kind == b"X":
            data = lzma.decompress(chunk[5:])
        elif kind == b"0":
            data = chunk[5:]
        else:
            data = zlib.decompress(chunk[4:])
        out[name] = unserialize(data)
    return out
