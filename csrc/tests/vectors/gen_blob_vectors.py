#!/usr/bin/env python3
"""Independent reference for docs/blob-format.md: builds the v1 blob test
vectors with Python's `cryptography`, not with softcxi's C code, so that the
C tests (which check these bytes) compare two implementations of the spec.

    python3 csrc/tests/vectors/gen_blob_vectors.py > csrc/tests/vectors/blob_v1.txt
"""
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives import serialization

ALGO = {"ec": 1, "ed25519": 2, "x25519": 3, "rsa": 4, "aes": 5,
        "hmac-sha256": 6, "hmac-sha384": 7, "hmac-sha512": 8}
CURVE = {"P-256": 1, "P-384": 2, "P-521": 3, "secp256k1": 4}
USAGE = {"decrypt": 1, "sign": 2, "derive": 4, "wrap": 8, "encrypt": 16,
         "verify": 32, "unwrap": 64}
EXPORT = {"deny": 0, "allow": 1, "allow-plain": 2, "deny-backup": 3}


def label_key(key, label):
    return hmac.new(key, label.encode(), hashlib.sha256).digest()


def aes_ecb(key, block):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def dbl(b):
    n = int.from_bytes(b, "big") << 1
    if n >> 128:
        n = (n & ((1 << 128) - 1)) ^ 0x87
    return n.to_bytes(16, "big")


def xaes_seal(key, nonce, pt, aad):
    k1 = dbl(aes_ecb(key, bytes(16)))
    m1 = bytes(a ^ b for a, b in zip(b"\x00\x01X\x00" + nonce[:12], k1))
    m2 = bytes(a ^ b for a, b in zip(b"\x00\x02X\x00" + nonce[:12], k1))
    kx = aes_ecb(key, m1) + aes_ecb(key, m2)
    return AESGCM(kx).encrypt(nonce[12:], pt, aad)  # ciphertext || tag


def tlv(tag, value):
    return bytes([tag]) + struct.pack(">H", len(value)) + value


def attrs(v):
    a = tlv(0x81, bytes([ALGO[v["algo"]]]))
    if v["algo"] == "ec":
        a += tlv(0x82, bytes([CURVE[v["curve"]]]))
    if v["algo"] in ("rsa", "aes") or v["algo"].startswith("hmac"):
        a += tlv(0x83, struct.pack(">H", v["size"]))
    a += tlv(0x84, bytes([sum(USAGE[u] for u in v["usage"])]))
    a += tlv(0x85, bytes([EXPORT[v["export"]]]))
    if v.get("expiry"):
        a += tlv(0x86, struct.pack(">q", v["expiry"]))
    if v.get("group"):
        a += tlv(0x87, v["group"].encode())
    if v.get("name"):
        a += tlv(0x08, v["name"].encode())
    if "specifier" in v:
        a += tlv(0x09, struct.pack(">I", v["specifier"]))
    if v.get("label"):
        a += tlv(0x0A, v["label"].encode())
    a += tlv(0x0B, struct.pack(">q", v["gen_date"]))
    if v.get("pub"):
        a += tlv(0x0C, v["pub"])
    return a


def blob(mbk, salt, v):
    kcv = label_key(mbk, "softcxi/v1/kcv")[:8]
    bkey = label_key(mbk, "softcxi/v1/blob/key")
    a = attrs(v)
    hdr = b"K" + bytes([1, 1, 0]) + kcv + salt + struct.pack(">HH", len(a), len(v["secret"]))
    aad = hdr + a
    return kcv, bkey, aad + xaes_seal(bkey, salt, v["secret"], aad)


def main():
    mbk = bytes(range(32))
    vectors = []

    d = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
    p256 = ec.derive_private_key(d, ec.SECP256R1())
    pub = p256.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)
    vectors.append(dict(algo="ec", curve="P-256", usage=["sign", "verify"], export="deny",
                        group="iot", name="dev-000001", gen_date=1767225600, pub=pub,
                        secret=d.to_bytes(32, "big"), salt=bytes(range(0x40, 0x58))))

    vectors.append(dict(algo="aes", size=256, usage=["decrypt", "encrypt"], export="allow",
                        expiry=1893456000, group="fleet", name="data-key", specifier=7,
                        label="backup data key", gen_date=1767225600,
                        secret=bytes(range(0xA0, 0xC0)), salt=bytes(24)))

    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    edpub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    vectors.append(dict(algo="ed25519", usage=["sign"], export="deny", gen_date=1,
                        pub=edpub, secret=seed, salt=b"ABCDEFGHIJKLMNOPQRSTUVWX"))

    print("# softcxi v1 key blob vectors (docs/blob-format.md), made by gen_blob_vectors.py")
    for v in vectors:
        kcv, bkey, b = blob(mbk, v["salt"], v)
        print()
        print("mbk =", mbk.hex())
        print("kcv =", kcv.hex())
        print("blob_key =", bkey.hex())
        print("salt =", v["salt"].hex())
        for k in ("algo", "curve", "size", "group", "name", "specifier", "label", "expiry",
                  "gen_date", "export"):
            if k in v:
                print(k, "=", v[k])
        print("usage =", ",".join(v["usage"]))
        if v.get("pub"):
            print("pub =", v["pub"].hex())
        print("secret =", v["secret"].hex())
        print("blob =", b.hex())


if __name__ == "__main__":
    main()
