#!/usr/bin/env python3
"""Seed corpora for the file-format fuzz targets (csrc/fuzz/fuzz_*.c).

    python3 csrc/fuzz/mkseeds.py        # rewrites csrc/fuzz/corpus/<target>/seed-*

Each seed starts with the target's mode byte (see the target's header
comment).  Where a target seals under a fixed key (keydb, audit, share,
backup under the vectors' MBK), the "raw" seeds are real, valid files made
here with Python's `cryptography` (the same independent implementation as
csrc/tests/vectors/gen_blob_vectors.py); where the key is the fuzz device's
own (users, revoked, device.mbk), the raw seeds only carry the framing and
the "sealed" seeds carry the payload.  Keep seeds small: the ctest replay
runs every truncation and byte change of each.
"""
import hashlib
import hmac
import os
import struct
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tests", "vectors"))
import gen_blob_vectors as gv  # noqa: E402

MBK = bytes(range(32))
FIXED_SALT = b"softcxi-fuzz-fixed-salt\x00"
KEYDB_SALT = b"softcxi-fuzz-keydb-salt\x00"
STORAGE_KEY = b"softcxi fuzz storage key 32 byte"
AUDIT_KEY = b"softcxi fuzz audit key 32 bytes\x00"
SHARE_PASSWORD = b"fuzz share password"


def kcv(key):
    return gv.label_key(key, "softcxi/v1/kcv")[:8]


def frame(typ, key, k, attrs, payload, salt=FIXED_SALT):
    hdr = b"K" + bytes([1, typ, 0]) + k + salt + struct.pack(">HH", len(attrs), len(payload))
    aad = hdr + attrs
    return aad + gv.xaes_seal(key, salt, payload, aad)


def vector_blobs():
    out = {}
    cur = {}
    for line in open(os.path.join(here, "..", "tests", "vectors", "blob_v1.txt")):
        line = line.strip()
        if not line or line.startswith("#"):
            if cur.get("blob"):
                out[cur["name"] if "name" in cur else "nameless"] = cur
            cur = {} if not line else cur
            continue
        k, _, v = line.partition(" = ")
        cur[k] = v
    if cur.get("blob"):
        out[cur.get("name", "nameless")] = cur
    return out


def write(target, name, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def users():
    def user(name, role, level, groups, cost=10, failures=0, locked=0):
        n, g = name.encode(), groups.encode()
        return (bytes([len(n)]) + n + bytes([role, level]) + struct.pack(">H", len(g)) + g +
                bytes([cost]) + bytes(range(16)) + bytes(range(32, 64)) +
                struct.pack(">Iq", failures, locked))
    p = struct.pack(">I", 2) + user("ADMIN", 1, 2, "") + user("app", 2, 0, "iot,fleet-*", 12, 3, 1767225600)
    write("users", "seed-sealed-two", b"\x01" + p)
    # logon seeds: the first user's verifier is that of the harness's password
    salt = bytes(range(16))
    ver = hashlib.scrypt(b"fuzz-logon-password", salt=salt, n=1 << 10, r=8, p=1, dklen=32)
    def user_v(name, role, level, groups, failures=0, locked=0):
        n, g = name.encode(), groups.encode()
        return (bytes([len(n)]) + n + bytes([role, level]) + struct.pack(">H", len(g)) + g +
                bytes([10]) + salt + ver + struct.pack(">Iq", failures, locked))
    write("users", "seed-logon-ok", b"\x03" + struct.pack(">I", 2) +
          user_v("ops", 2, 1, "iot") + user("ADMIN", 1, 2, ""))
    write("users", "seed-logon-after-failures", b"\x03" + struct.pack(">I", 1) +
          user_v("ops", 1, 2, "*", 5, 0))
    write("users", "seed-logon-wrong", b"\x03" + struct.pack(">I", 1) + user("ops", 2, 0, "*", 10, 3))
    write("users", "seed-sealed-none", b"\x01" + struct.pack(">I", 0))
    key = bytes(32)
    write("users", "seed-raw-frame", b"\x00" + frame(0x12, key, kcv(key), b"", p[:60]))


def keydb():
    vb = vector_blobs()
    b1 = bytes.fromhex(vb["dev-000001"]["blob"])
    b2 = bytes.fromhex(vb["data-key"]["blob"])
    def entry(g, n, blob, spec=None):
        g, n = g.encode(), n.encode()
        return (bytes([1 if spec is not None else 0, len(g), len(n)]) +
                struct.pack(">II", spec or 0, len(blob)) + g + n + blob)
    p = struct.pack(">I", 2) + entry("fleet", "data-key", b2, 7) + entry("iot", "dev-000001", b1)
    gen = struct.pack(">Q", 3)
    write("keydb", "seed-sealed-two", b"\x01" + gen + p)
    write("keydb", "seed-sealed-empty", b"\x03" + gen + struct.pack(">I", 0))
    hdr = (b"K" + bytes([1, 0x30, 0]) + kcv(STORAGE_KEY) + KEYDB_SALT + gen +
           struct.pack(">I", len(p)))
    img = hdr + gv.xaes_seal(STORAGE_KEY, KEYDB_SALT, p, hdr)
    write("keydb", "seed-raw-two", b"\x02" + img)


def revoked():
    def entry(i, t, g, n, r):
        return (hashlib.sha256(bytes([i])).digest() + struct.pack(">q", t) +
                bytes([len(g)]) + g + bytes([len(n)]) + n + bytes([len(r)]) + r)
    p = entry(1, 1767225600, b"iot", b"dev-000001", b"lost") + entry(2, -1, b"", b"x", b"")
    write("revoked", "seed-sealed-two", b"\x01" + p)
    key = bytes(32)
    write("revoked", "seed-raw-frame", b"\x00" + frame(0x13, key, kcv(key), b"", p[:50]))


def share():
    attrs = (gv.tlv(0x10, b"\x01") + gv.tlv(0x11, b"\x01") + gv.tlv(0x12, b"\x01") +
             gv.tlv(0x13, b"\x01") + gv.tlv(0x14, b"\x0a") + gv.tlv(0x15, struct.pack(">q", 1767225600)))
    share_bytes = bytes(range(100, 132))
    write("share", "seed-sealed-1of1", b"\x01" + bytes([len(attrs)]) + attrs + share_bytes)
    xor2 = attrs.replace(gv.tlv(0x10, b"\x01"), gv.tlv(0x10, b"\x02")).replace(
        gv.tlv(0x13, b"\x01"), gv.tlv(0x13, b"\x02")).replace(gv.tlv(0x12, b"\x01"), gv.tlv(0x12, b"\x02"))
    write("share", "seed-sealed-xor-twice", b"\x03" + bytes([len(xor2)]) + xor2 + share_bytes)
    salt = bytes(range(24))
    pk = hashlib.scrypt(SHARE_PASSWORD, salt=salt, n=1 << 10, r=8, p=1, dklen=32)
    write("share", "seed-raw-1of1", b"\x00" + frame(0x20, pk, kcv(share_bytes), attrs, share_bytes, salt))


def devkey():
    key = bytes(range(64, 96))
    write("devkey", "seed-keyfile", b"\x00" + b"K\x01\x11\x00" + kcv(key) + key)
    ident = b"0123456789abcdef0123456789abcdef"
    attrs = gv.tlv(0x08, ident)
    write("devkey", "seed-sealed-two-mbks", b"\x02" + bytes([len(attrs)]) + attrs + MBK + bytes(32))
    write("devkey", "seed-raw-state", b"\x01" + frame(0x10, key, kcv(key), attrs, MBK))


def backup():
    vb = vector_blobs()
    v = vb["dev-000001"]
    blob = bytes.fromhex(v["blob"])
    alen = struct.unpack(">H", blob[36:38])[0]
    attrs = blob[40:40 + alen]
    payload = b"\x03iot\x0adev-000001\x00" + bytes(4) + blob
    write("backup", "seed-sealed-ec", b"\x01" + bytes([0]) + payload)  # no attributes: short
    bkey = gv.label_key(MBK, "softcxi/v1/blob/key-backup")
    write("backup", "seed-raw-ec", b"\x00" + frame(0x02, bkey, kcv(MBK), attrs, payload))
    v = vb["data-key"]
    blob = bytes.fromhex(v["blob"])
    payload = b"\x05fleet\x08data-key\x01" + struct.pack(">I", 7) + blob
    write("backup", "seed-sealed-aes", b"\x01" + bytes([0]) + payload)


def audit():
    lines = [b"1\t1767225600\tinit\tADMIN\tdevice created; first administrator\t",
             b"2\t1767225601\tlogon\tADMIN\tadmin\t",
             b"3\t-5\tuser_add\tapp\\tx\\n\\\\\\x01\tby ADMIN\t",
             b"4\t1767225603\tkey_delete\troot\tiot\t"]
    log = b"".join(l + b"0" * 64 + b"\n" for l in lines)
    write("audit", "seed-chain-sealed", bytes([1 | 1 << 1]) + log)
    write("audit", "seed-chain-crash", bytes([1 | 2 << 1]) + log + b"5\t17")
    write("audit", "seed-chain-nocount", bytes([1]) + log[:60])
    # raw: a real chain and counter under the fuzz audit key
    prev, out = bytes(32), b""
    for l in lines[:2]:
        mac = hmac.new(AUDIT_KEY, prev + l, hashlib.sha256).digest()
        out += l + mac.hex().encode() + b"\n"
        prev = mac
    count = struct.pack(">Q", 2) + prev
    count += hmac.new(AUDIT_KEY, b"softcxi/v1/audit-count" + count, hashlib.sha256).digest()
    write("audit", "seed-raw-counted", bytes([3 << 1]) + out + count)


if __name__ == "__main__":
    for f in (users, keydb, revoked, share, devkey, backup, audit):
        f()
