"""Packing binary codes into uint64 words: round trips, the documented bit order, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InputError
from indexes.codes import n_words, pack_codes, to_bits, unpack_codes


@pytest.mark.parametrize("n_bits", [8, 13, 63, 64, 65, 128, 200, 1000, 1024])
def test_round_trip_signed_and_binary(n_bits: int) -> None:
    rng = np.random.default_rng(n_bits)
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(9, n_bits))
    packed = pack_codes(signs)
    assert packed.dtype == np.uint64 and packed.shape == (9, n_words(n_bits))
    np.testing.assert_array_equal(unpack_codes(packed, n_bits), signs)
    np.testing.assert_array_equal(pack_codes((signs > 0).astype(np.uint8)), packed)
    np.testing.assert_array_equal(pack_codes(signs > 0), packed)
    np.testing.assert_array_equal(pack_codes(signs.astype(np.float32)), packed)


def test_bit_order_is_lsb_first_within_words() -> None:
    n_bits = 130
    for j in (0, 1, 63, 64, 100, 129):
        bits = np.zeros((1, n_bits), dtype=np.uint8)
        bits[0, j] = 1
        packed = pack_codes(bits)
        expected = np.zeros((1, 3), dtype=np.uint64)
        expected[0, j // 64] = np.uint64(1) << np.uint64(j % 64)
        np.testing.assert_array_equal(packed, expected)


def test_bytes_match_little_endian_packbits() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, size=(5, 96), dtype=np.uint8)
    as_bytes = pack_codes(bits).view(np.uint8)  # (5, 16)
    np.testing.assert_array_equal(as_bytes[:, :12], np.packbits(bits, axis=1, bitorder="little"))
    assert not as_bytes[:, 12:].any()


def test_hamming_distance_is_preserved() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.choice([-1, 1], size=(2, 4, 77))
    packed_a, packed_b = pack_codes(a), pack_codes(b)
    dist = np.bitwise_count(packed_a ^ packed_b).sum(axis=1)
    np.testing.assert_array_equal(dist, (a != b).sum(axis=1))


def test_to_bits_maps_plus_one_to_one() -> None:
    np.testing.assert_array_equal(
        to_bits(np.array([-1, 1, 0, 1])), np.array([0, 1, 0, 1], np.uint8)
    )


@pytest.mark.parametrize("bad", [np.array([[1, 2]]), np.array([[0.5, 1.0]])])
def test_to_bits_rejects_other_values(bad: np.ndarray) -> None:
    with pytest.raises(InputError, match="expected code values in"):
        to_bits(bad)


def test_to_bits_rejects_strings() -> None:
    with pytest.raises(InputError, match="expected integer, bool or float codes"):
        to_bits(np.array(["a"]))


@pytest.mark.parametrize("n_bits", [0, 7, 1025])
def test_bit_lengths_outside_8_to_1024_are_refused(n_bits: int) -> None:
    with pytest.raises(InputError, match="expected n_bits in 8..1024"):
        pack_codes(np.ones((2, n_bits), dtype=np.int8))


def test_pack_refuses_one_dimensional_codes() -> None:
    with pytest.raises(InputError, match=r"expected codes of shape \(n, n_bits\)"):
        pack_codes(np.ones(64, dtype=np.int8))


def test_unpack_refuses_wrong_dtype_and_width() -> None:
    with pytest.raises(InputError, match="expected packed codes of dtype uint64"):
        unpack_codes(np.zeros((2, 8), dtype=np.uint8), 64)
    with pytest.raises(InputError, match=r"expected packed codes of shape \(n, 2\)"):
        unpack_codes(np.zeros((2, 1), dtype=np.uint64), 128)
    with pytest.raises(InputError, match="bits past bit 40 set to 0"):
        unpack_codes(np.full((1, 1), 1 << 41, dtype=np.uint64), 40)


def test_n_words() -> None:
    assert [n_words(b) for b in (8, 64, 65, 128, 1024)] == [1, 1, 2, 2, 16]
