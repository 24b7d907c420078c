"""Binary codes <-> packed uint64 words: the one place that knows the bit order.

Bit order: bit j of a code (column j of an (n, n_bits) array) is stored in word j // 64 at bit
position j % 64, counting from the least significant bit. Bits past n_bits in the last word are 0.
On a little-endian machine, `packed.view(np.uint8)` is therefore exactly
`np.packbits(bits, axis=1, bitorder="little")` padded to whole words, which is the byte layout
FAISS binary indexes take.
"""

from __future__ import annotations

import numpy as np

from common.errors import InputError

MIN_BITS = 8
MAX_BITS = 1024
WORD_BITS = 64


def n_words(n_bits: int) -> int:
    """How many uint64 words hold one code of n_bits bits (raises InputError outside 8..1024)."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int | np.integer):
        raise InputError(f"expected n_bits as an int, got {type(n_bits).__name__}")
    if not MIN_BITS <= n_bits <= MAX_BITS:
        raise InputError(f"expected n_bits in {MIN_BITS}..{MAX_BITS}, got {n_bits}")
    return (int(n_bits) + WORD_BITS - 1) // WORD_BITS


def to_bits(codes: np.ndarray) -> np.ndarray:
    """{-1,+1} or {0,1} codes (integer, bool or float, any shape) -> uint8 bits: +1 -> 1, else 0.

    Values other than -1, 0 and +1 raise InputError: a real-valued embedding must be binarised
    (e.g. with np.sign) by the caller, not here.
    """
    arr: np.ndarray = np.asarray(codes)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"expected integer, bool or float codes, got dtype {arr.dtype}")
    bad = (arr != 1) & (arr != 0) & (arr != -1)
    if bad.any():
        first = arr[np.unravel_index(int(np.argmax(bad)), arr.shape)]
        raise InputError(f"expected code values in {{-1, 0, +1}}, got {first!r}")
    bits: np.ndarray = np.equal(arr, 1).astype(np.uint8)
    return bits


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, n_bits) {-1,+1} or {0,1} codes -> (n, n_words(n_bits)) uint64, in the order above."""
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise InputError(f"expected codes of shape (n, n_bits), got shape {arr.shape}")
    n, n_bits = arr.shape
    words = n_words(n_bits)
    packed = np.packbits(to_bits(arr), axis=1, bitorder="little")  # (n, ceil(n_bits / 8))
    out = np.zeros((n, words * 8), dtype=np.uint8)
    out[:, : packed.shape[1]] = packed
    # The explicit little-endian view keeps the bit order the same on any host.
    return out.view("<u8").astype(np.uint64, copy=False)


def unpack_codes(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, n_words(n_bits)) uint64 -> (n, n_bits) int8 codes in {-1, +1}; inverse of pack_codes."""
    words = n_words(n_bits)
    check_packed(packed, n_bits, name="packed codes")
    as_bytes = np.ascontiguousarray(packed).astype("<u8", copy=False).view(np.uint8)
    bits = np.unpackbits(as_bytes.reshape(packed.shape[0], words * 8), axis=1, bitorder="little")
    return (bits[:, :n_bits].astype(np.int8) * 2 - 1).astype(np.int8)


def padding_mask(n_bits: int) -> np.uint64:
    """The bits of the last word that lie past n_bits (all of them must be 0 in a valid code)."""
    used = n_bits - (n_words(n_bits) - 1) * WORD_BITS
    if used == WORD_BITS:
        return np.uint64(0)
    return np.uint64(~((1 << used) - 1) & 0xFFFF_FFFF_FFFF_FFFF)


def check_packed(packed: np.ndarray, n_bits: int, *, name: str) -> None:
    """Raise InputError unless `packed` is (n, n_words(n_bits)) uint64 with zero padding bits.

    No cast is made: a uint8 or int64 array is refused, because reinterpreting its bytes would
    silently change the distances.
    """
    words = n_words(n_bits)
    if not isinstance(packed, np.ndarray):
        raise InputError(f"expected {name} as a numpy array, got {type(packed).__name__}")
    if packed.dtype != np.uint64:
        raise InputError(
            f"expected {name} of dtype uint64 (pack them with indexes.codes.pack_codes), "
            f"got {packed.dtype}"
        )
    if packed.ndim != 2 or packed.shape[1] != words:
        raise InputError(
            f"expected {name} of shape (n, {words}) for {n_bits}-bit codes, "
            f"got shape {packed.shape}"
        )
    pad = padding_mask(n_bits)
    if pad and packed.shape[0] and bool((packed[:, -1] & pad).any()):
        raise InputError(
            f"expected {name} with the bits past bit {n_bits} set to 0 "
            f"(codes of {n_bits} bits), got longer codes"
        )
