#!/usr/bin/env python3
"""Independent pure-Python reference for esddpm-core's seeded Gaussian noise.

Usage (from anywhere):

    python tools/reference/noise_reference.py [--out PATH]

PATH defaults to ``core/tests/data/noise_golden.json`` under the repository root
(computed from this file's location).

This module re-implements, from the documented algorithm only and using nothing
but the Python standard library (``struct``, ``math``), the noise generator of
the Rust crate esddpm-core (module ``noise``).  It exists so the Rust
implementation can be cross-checked bit for bit against code that shares no
source with it.

Algorithm
---------
Bits -- ChaCha20 with 20 rounds in the original djb layout, the layout used by
Rust's ``rand_chacha::ChaCha20Rng``.  The 16-word input state is

* words 0-3:   the constants "expand 32-byte k"
  (0x61707865, 0x3320646e, 0x79622d32, 0x6b206574);
* words 4-11:  the 32-byte key as little-endian u32 words;
* words 12-13: the 64-bit block counter, low word first;
* words 14-15: the 64-bit stream id (nonce), low word first.

A block is 10 double rounds (a column round then a diagonal round, each four
quarter rounds on 32-bit words) applied to a copy of the input state, after
which the input state is added word-wise mod 2**32.  The 16 resulting words are
the block's output, consumed in order 0..15.

* key       = ``seed.to_le_bytes()`` (8 bytes, seed is a u64) + 24 zero bytes;
* stream id = the image index (u64);
* the generator starts at word position ``draw_index << 32``; word position p
  is word ``p % 16`` of block (counter) ``p // 16``.

Draw indices: Latent = 0, Start = 1, Step(k) = 2 + 2k, Mask(k) = 3 + 2k.

``next_u64`` consumes two consecutive u32 words; the first is the LOW half and
the second the HIGH half (rand_core's convention).

Normals -- Box-Muller on pairs::

    a = next_u64(); b = next_u64()
    u1 = ((a >> 11) + 1) * 2**-53          # in (0, 1]
    u2 = (b >> 11) * 2**-53                # in [0, 1)
    r = sqrt(-2 * ln(u1)); theta = 2 * pi * u2
    z0 = r * cos(theta); z1 = r * sin(theta)

computed in float64, each rounded (round-to-nearest-even) to float32, emitted
z0, z1, z0, z1, ...  Float32 rounding is done with ``struct.pack('<f', x)``,
and the bit pattern is ``struct.unpack('<I', ...)`` of that.

Caveat: Python's ``math.log``/``cos``/``sin`` come from the platform C libm,
the Rust side from its own libm/std.  If these ever differ by an ulp in f64,
the float32 result could (rarely) differ; the bit patterns in the golden file
are what this reference computes.

The script also self-tests the ChaCha20 block function against the RFC 7539
section 2.3.2 test vector (32-bit counter 1, nonce 00:00:00:09:00:00:00:4a:
00:00:00:00, which in the 64/64 layout is words 12..15 = 1, 0x09000000,
0x4a000000, 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")

DRAW_BASE = {"Latent": 0, "Start": 1}


def _rotl32(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & MASK32


def _quarter_round(s: list, a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & MASK32
    s[d] = _rotl32(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK32
    s[b] = _rotl32(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & MASK32
    s[d] = _rotl32(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK32
    s[b] = _rotl32(s[b] ^ s[c], 7)


def chacha20_block(state: list) -> list:
    """Return the 16 output words of one ChaCha20 block for a 16-word input state."""
    if len(state) != 16:
        raise ValueError("state must have 16 words")
    w = list(state)
    for _ in range(10):
        # column round
        _quarter_round(w, 0, 4, 8, 12)
        _quarter_round(w, 1, 5, 9, 13)
        _quarter_round(w, 2, 6, 10, 14)
        _quarter_round(w, 3, 7, 11, 15)
        # diagonal round
        _quarter_round(w, 0, 5, 10, 15)
        _quarter_round(w, 1, 6, 11, 12)
        _quarter_round(w, 2, 7, 8, 13)
        _quarter_round(w, 3, 4, 9, 14)
    return [(w[i] + state[i]) & MASK32 for i in range(16)]


def input_state(key: bytes, counter: int, stream: int) -> list:
    """Build the djb-layout input state (64-bit counter, 64-bit stream id)."""
    if len(key) != 32:
        raise ValueError("key must be 32 bytes")
    counter &= MASK64
    stream &= MASK64
    return (
        list(CONSTANTS)
        + list(struct.unpack("<8I", key))
        + [counter & MASK32, counter >> 32, stream & MASK32, stream >> 32]
    )


def seed_key(seed: int) -> bytes:
    if not 0 <= seed <= MASK64:
        raise ValueError("seed must be a u64")
    return struct.pack("<Q", seed) + bytes(24)


def draw_index_of(draw: str, k=None) -> int:
    if draw in DRAW_BASE:
        if k is not None:
            raise ValueError(f"{draw} takes no k")
        return DRAW_BASE[draw]
    if draw == "Step":
        return 2 + 2 * k
    if draw == "Mask":
        return 3 + 2 * k
    raise ValueError(f"unknown draw {draw!r}")


class WordStream:
    """Sequential u32 words of ChaCha20 starting at an arbitrary word position."""

    def __init__(self, seed: int, stream: int, word_pos: int) -> None:
        self.key = seed_key(seed)
        self.stream = stream
        self.block = word_pos // 16
        self.index = word_pos % 16
        self.buf = None

    def next_u32(self) -> int:
        if self.buf is None or self.index == 16:
            if self.buf is not None:
                self.block += 1
                self.index = 0
            self.buf = chacha20_block(input_state(self.key, self.block, self.stream))
        v = self.buf[self.index]
        self.index += 1
        return v

    def next_u64(self) -> int:
        lo = self.next_u32()
        hi = self.next_u32()
        return (hi << 32) | lo


def to_f32(x: float):
    """Round a float64 to float32 (nearest); return (value as Python float, bits)."""
    packed = struct.pack("<f", x)
    return struct.unpack("<f", packed)[0], struct.unpack("<I", packed)[0]


def normals(seed: int, image: int, draw_index: int, n: int) -> list:
    """First n standard normals of (seed, image, draw_index) as (float32 value, bits)."""
    ws = WordStream(seed, image, (draw_index << 32))
    out = []
    two_pi = 2.0 * math.pi
    scale = 2.0 ** -53
    while len(out) < n:
        a = ws.next_u64()
        b = ws.next_u64()
        u1 = float((a >> 11) + 1) * scale
        u2 = float(b >> 11) * scale
        r = math.sqrt(-2.0 * math.log(u1))
        theta = two_pi * u2
        out.append(to_f32(r * math.cos(theta)))
        if len(out) < n:
            out.append(to_f32(r * math.sin(theta)))
    return out


# --------------------------------------------------------------------------- #
# Self-tests
# --------------------------------------------------------------------------- #

RFC7539_232_OUTPUT = [
    0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3,
    0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
    0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9,
    0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2,
]

RFC7539_232_SERIALIZED = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4"
    "c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2"
    "b5129cd1de164eb9cbd083e8a2503c4e"
)


def self_test_rfc7539() -> None:
    key = bytes(range(32))
    # 32-bit counter 1 + 96-bit nonce 00:00:00:09:00:00:00:4a:00:00:00:00
    # == 64-bit counter words (1, 0x09000000), 64-bit stream words (0x4a000000, 0)
    state = input_state(key, (0x09000000 << 32) | 1, 0x4A000000)
    expected_state = [
        0x61707865, 0x3320646E, 0x79622D32, 0x6B206574,
        0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C,
        0x13121110, 0x17161514, 0x1B1A1918, 0x1F1E1D1C,
        0x00000001, 0x09000000, 0x4A000000, 0x00000000,
    ]
    assert state == expected_state, "RFC 7539 2.3.2 input state mismatch"
    out = chacha20_block(state)
    assert out == RFC7539_232_OUTPUT, "RFC 7539 2.3.2 block output mismatch"
    assert struct.pack("<16I", *out) == RFC7539_232_SERIALIZED, (
        "RFC 7539 2.3.2 serialized block mismatch"
    )


# First 6 bit patterns produced by the Rust implementation (cross-check).
RUST_FIRST6 = [
    ((0, 0, "Start", None),
     [0x3F0C890C, 0xBFD2CCE9, 0x3E59C901, 0xBF4434F6, 0x3F0FF316, 0xBF6C14FF]),
    ((42, 0, "Latent", None),
     [0xBEB5C3CF, 0xBFA2F4E8, 0x3EFD7F93, 0x3F2E76E1, 0xBED0E253, 0x3ED07B8D]),
    ((42, 3, "Step", 7),
     [0x3F7D2D62, 0xBFBD7F30, 0xBE864040, 0x400DC7EC, 0xBFEE146B, 0x3E1945B2]),
    ((MASK64, 1, "Mask", 0),
     [0xBF81FB1C, 0x3FCE116A, 0x3E5C10D2, 0x3D920AD7, 0x3F03B143, 0x3F132F28]),
]


def check_rust_first6() -> list:
    """Return a list of human-readable mismatches (empty if all match)."""
    problems = []
    for (seed, image, draw, k), want in RUST_FIRST6:
        got = [b for _, b in normals(seed, image, draw_index_of(draw, k), len(want))]
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                problems.append(
                    f"({seed}, {image}, {draw}{'' if k is None else f'({k})'}) "
                    f"value {i}: python 0x{g:08x} != rust 0x{w:08x}"
                )
    return problems


# --------------------------------------------------------------------------- #
# Golden file
# --------------------------------------------------------------------------- #

CASES = [
    (0, 0, "Start", None),
    (42, 0, "Latent", None),
    (42, 3, "Step", 7),
    (MASK64, 1, "Mask", 0),
    (1, 0, "Step", 0),
    (123456789, 7, "Step", 999),
    (42, 0, "Start", None),
    (42, 1, "Start", None),
]

N_VALUES = 16


def build_golden() -> dict:
    cases = []
    for seed, image, draw, k in CASES:
        di = draw_index_of(draw, k)
        vals = normals(seed, image, di, N_VALUES)
        cases.append({
            "seed": seed,
            "image": image,
            "draw": draw,
            "k": k,
            "draw_index": di,
            "values": [v for v, _ in vals],
            "bits": [b for _, b in vals],
        })
    return {
        "generator": (
            "tools/reference/noise_reference.py; pure-Python ChaCha20 (djb layout, "
            "64-bit counter words 12-13, 64-bit stream words 14-15) + Box-Muller, "
            f"Python {sys.version_info.major}.{sys.version_info.minor}"
        ),
        "cases": cases,
    }


def main(argv=None) -> int:
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.join(repo_root, "core", "tests", "data", "noise_golden.json"),
        help="output JSON path",
    )
    args = parser.parse_args(argv)

    self_test_rfc7539()
    print("RFC 7539 2.3.2 block function self-test: OK")

    problems = check_rust_first6()
    if problems:
        print("MISMATCH against Rust-provided first 6 values:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
    else:
        print("Rust-provided first 6 values of 4 cases: all bits match")

    golden = build_golden()
    text = json.dumps(golden, separators=(",", ":")) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(golden['cases'])} cases)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
