"""Secure aggregation: Shamir sharing, masking, dropout recovery and the privacy invariants."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from syncfed import secagg
from syncfed.exceptions import AggregationError, ConfigError, ProtocolError
from syncfed.secagg import (
    CIPHERTEXT_SIZE,
    PRIME,
    SHARE_SIZE,
    AdvertiseKeys,
    ForwardedShares,
    MaskedInput,
    Quantizer,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggResult,
    SecAggServer,
    UnmaskRequest,
    UnmaskShares,
    combine_shares,
    flatten,
    neighbour_graph,
    simulate,
    split_secret,
    unflatten,
)

FAST = settings(max_examples=25, deadline=None)
SESSION = bytes(range(32))


def seeded(seed: int) -> Callable[[int], bytes]:
    """A reproducible stand-in for os.urandom, so statistical tests have one fixed outcome."""
    return random.Random(seed).randbytes


def make_config(n: int, threshold: int, length: int, **settings: object) -> SecAggConfig:
    return SecAggConfig(n, threshold, length, clip=1.0, session=SESSION, **settings)  # type: ignore[arg-type]


def run_round(
    config: SecAggConfig,
    vectors: Sequence[np.ndarray],
    counts: Sequence[int],
    *,
    drop_after: Mapping[int, int] | None = None,
    seed: int = 0,
) -> tuple[dict[int, MaskedInput], SecAggResult]:
    """Push one round through real clients and a server, dropping clients as asked; return what the server saw."""
    drops = drop_after or {}
    clients = [SecAggClient(config, u, random_bytes=seeded(seed + u)) for u in range(config.num_clients)]
    server = SecAggServer(config)

    def alive(step: int) -> list[int]:
        return [u for u in range(config.num_clients) if drops.get(u, 4) >= step]

    keys = server.receive_keys([clients[u].advertise_keys() for u in alive(0)])
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in alive(1)])
    masked = {u: clients[u].mask_input(forwarded[u], vectors[u], counts[u]) for u in alive(2)}
    request = server.receive_masked_inputs(masked.values())
    result = server.receive_unmask_shares([clients[u].unmask(request) for u in alive(3)])
    return masked, result


def shared_round(config: SecAggConfig) -> tuple[list[SecAggClient], SecAggServer, dict[int, ForwardedShares]]:
    """Clients and a server that went through steps 0 and 1 with nobody dropping."""
    clients = [SecAggClient(config, u) for u in range(config.num_clients)]
    server = SecAggServer(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    return clients, server, server.receive_shares([c.share_keys(keys[u]) for u, c in enumerate(clients)])


def lagrange_at(points: Mapping[int, int], x: int) -> int:
    """The value at x of the polynomial through points, mod PRIME, written out independently of the module."""
    total = 0
    for xi, yi in points.items():
        term = yi
        for xj in points:
            if xj != xi:
                term = term * (x - xj) * pow(xi - xj, PRIME - 2, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


# Shamir sharing


def test_prime_is_a_mersenne_prime_above_256_bits() -> None:
    # Lucas-Lehmer: for an odd prime p, 2^p - 1 is prime iff s_(p-2) = 0, where s_0 = 4, s_(i+1) = s_i^2 - 2.
    p = PRIME.bit_length()
    assert PRIME == 2**p - 1 and PRIME > 2**256 and all(p % d for d in range(2, p))
    s = 4
    for _ in range(p - 2):
        s = (s * s - 2) % PRIME
    assert s == 0


@FAST
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.sets(st.integers(0, 200), min_size=1, max_size=12),
    data=st.data(),
)
def test_any_threshold_shares_rebuild_the_secret(secret: bytes, holders: set[int], data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, len(holders)))
    shares = split_secret(secret, threshold, holders)
    assert set(shares) == holders and all(len(share) == SHARE_SIZE for share in shares.values())
    chosen = data.draw(st.sets(st.sampled_from(sorted(holders)), min_size=threshold, max_size=len(holders)))
    assert combine_shares({holder: shares[holder] for holder in chosen}, threshold) == secret


def test_fewer_shares_than_the_threshold_are_refused() -> None:
    shares = split_secret(bytes(range(32)), 3, [0, 1, 2, 3])
    with pytest.raises(SecAggError, match="^2 shares are fewer than the threshold of 3$"):
        combine_shares({0: shares[0], 1: shares[1]}, 3)


def test_fewer_shares_than_the_threshold_fit_any_secret() -> None:
    # Perfect secrecy: for any other secret, one forged share completes two real shares into a rebuild of it.
    secret, other = bytes(range(32)), bytes(range(32, 64))
    shares = split_secret(secret, 3, [0, 1, 2, 3])
    points = {0: int.from_bytes(other, "big")} | {h + 1: int.from_bytes(shares[h], "big") for h in (0, 1)}
    forged = lagrange_at(points, 3 + 1).to_bytes(SHARE_SIZE, "big")
    assert combine_shares({0: shares[0], 1: shares[1], 3: forged}, 3) == other
    assert combine_shares({0: shares[0], 1: shares[1], 3: shares[3]}, 3) == secret


def test_a_share_outside_the_field_is_refused() -> None:
    shares = split_secret(bytes(32), 2, [0, 1])
    with pytest.raises(ProtocolError, match="^share from client 1 is not an element of the field$"):
        combine_shares({0: shares[0], 1: b"\xff" * SHARE_SIZE}, 2)


# The neighbour graph


@FAST
@given(n=st.integers(2, 40), data=st.data(), seed=st.integers(0, 2**32))
def test_neighbour_graph_is_regular_and_symmetric(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, n - 1).filter(lambda k: not (k % 2 and n % 2)))
    graph = neighbour_graph(n, k, seed)
    assert len(graph) == n
    for u, links in enumerate(graph):
        assert len(links) == k and u not in links
        assert all(u in graph[v] for v in links)
    assert graph == neighbour_graph(n, k, seed)
    if k == n - 1:
        assert all(links == set(range(n)) - {u} for u, links in enumerate(graph))


def test_neighbour_graph_refuses_impossible_degrees() -> None:
    with pytest.raises(ConfigError, match="^neighbour count 3 must be even with an odd number of clients 7$"):
        neighbour_graph(7, 3, 0)
    with pytest.raises(ConfigError, match="^neighbour count 7 must be between 1 and 6$"):
        neighbour_graph(7, 7, 0)


# Settings and their limits


def test_threshold_must_be_a_majority_of_the_share_holders() -> None:
    make_config(5, 3, 4)  # 5 holders: 3 is the smallest majority
    make_config(5, 5, 4)
    for threshold in (2, 6):
        with pytest.raises(ConfigError, match=f"^threshold {threshold} must be more than half of, and at most, the 5"):
            make_config(5, threshold, 4)
    make_config(8, 3, 4, neighbours=4)  # 5 holders again with SecAgg+


def test_quantizer_counts_fit_the_ring_at_the_limit_and_not_past_it() -> None:
    limit = (2**31 - 1) // 10
    Quantizer(10, 1.0, 32, limit)
    with pytest.raises(ConfigError, match=f"^max count {limit + 1} times 10 clients does not fit a 32-bit ring$"):
        Quantizer(10, 1.0, 32, limit + 1)
    with pytest.raises(ConfigError, match="^ring of 16 bits is not one of 32, 64$"):
        Quantizer(10, 1.0, 16)


@pytest.mark.parametrize("bits", [32, 64])
def test_extreme_values_from_every_client_do_not_wrap(bits: int) -> None:
    quantizer = Quantizer(7, 2.5, bits, max_count=50)
    for sign in (1.0, -1.0):
        total = np.zeros(4, dtype=np.int64)
        for _ in range(7):
            total += quantizer.encode(np.full(3, sign * 9.0), 50).astype(np.int64)  # clipped to 2.5
        weighted, count = quantizer.decode(total.astype(quantizer.dtype))
        assert count == 350
        np.testing.assert_allclose(weighted, sign * 2.5 * 350, rtol=0, atol=quantizer.error_bound)


@FAST
@given(seed=st.integers(0, 2**32), n=st.integers(1, 12), bits=st.sampled_from([32, 64]))
def test_decoded_sum_is_within_the_bound(seed: int, n: int, bits: int) -> None:
    rng = np.random.default_rng(seed)
    quantizer = Quantizer(n, 3.0, bits, max_count=1000)
    vectors = rng.uniform(-3.0, 3.0, (n, 50))
    counts = rng.integers(1, 1001, n)
    total = sum(
        quantizer.encode(vector, int(count)).astype(np.int64) for vector, count in zip(vectors, counts, strict=True)
    )
    weighted, count = quantizer.decode(np.asarray(total).astype(quantizer.dtype))
    assert count == counts.sum()
    assert np.abs(weighted - counts @ vectors).max() <= quantizer.error_bound
    assert quantizer.error_bound < 3.0 * 1000 * n * 2.0**-20  # and the bound is not vacuous


def test_flatten_follows_sorted_names_and_unflatten_restores_tensors() -> None:
    weights = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.0]), "m": np.array([3], np.int64)}
    vector = flatten(weights)
    np.testing.assert_array_equal(vector, [7.0, 3.0, 0, 1, 2, 3, 4, 5])
    assert flatten(dict(reversed(weights.items()))).tolist() == vector.tolist()
    restored = unflatten(vector + 0.2, weights)
    assert list(restored) == ["z", "a", "m"]
    assert restored["m"].dtype == np.int64 and restored["m"].tolist() == [3]
    assert restored["z"].dtype == np.float32 and restored["z"].shape == (2, 3)
    with pytest.raises(AggregationError, match=r"^vector of shape \(7,\) does not hold tensors of 8 values$"):
        unflatten(vector[:7], weights)


# What the server sees


def byte_uniformity(vector: np.ndarray) -> tuple[float, float]:
    """Chi-square p-values that the top byte of each element, and every byte, are uniform over 0..255."""
    raw = vector.view(np.uint32)
    top = np.bincount((raw >> 24).astype(np.int64), minlength=256)
    every = np.bincount(raw.view(np.uint8), minlength=256)
    return float(stats.chisquare(top).pvalue), float(stats.chisquare(every).pvalue)


def test_masked_input_is_indistinguishable_from_uniform() -> None:
    # Small values sit at the bottom of the ring (top byte 0x00 or 0xff); masked, every byte must look uniform.
    # Randomness is seeded, so the p-values are fixed: a truly uniform vector would pass 0.001 with 99.9% odds.
    n, length = 3, 20_000
    config = make_config(n, 2, length, max_count=100)
    rng = np.random.default_rng(7)
    vectors = [rng.normal(0, 0.01, length) for _ in range(n)]
    masked, _ = run_round(config, vectors, [40, 50, 60], seed=11)
    plain = config.quantizer.encode(vectors[0], 40)
    assert min(byte_uniformity(plain)) < 1e-10  # the check can fail: the unmasked vector does
    assert min(byte_uniformity(masked[0].vector)) > 1e-3
    top_bits = (masked[0].vector.view(np.uint32) >> 16).astype(np.float64) / 2**16
    assert stats.kstest(top_bits, "uniform").pvalue > 1e-3


def test_protocol_sum_equals_the_plain_sum_of_quantized_inputs_exactly() -> None:
    n, length = 5, 300
    config = make_config(n, 3, length, max_count=100)
    rng = np.random.default_rng(1)
    vectors = [rng.uniform(-1, 1, length) for _ in range(n)]
    counts = [5, 17, 100, 1, 60]
    _, result = run_round(config, vectors, counts, seed=3)
    expected = sum(config.quantizer.encode(v, c).astype(np.int64) for v, c in zip(vectors, counts, strict=True)) % 2**32
    np.testing.assert_array_equal(result.total.view(np.uint32), np.asarray(expected).astype(np.uint32))
    assert result.count == sum(counts) and result.clients == (0, 1, 2, 3, 4)


def fedavg64(inputs: Sequence[Mapping[str, np.ndarray]], counts: Sequence[int]) -> dict[str, np.ndarray]:
    """Example-weighted average in float64 through np.average, independently of syncfed."""
    return {name: np.average(np.stack([w[name] for w in inputs]), axis=0, weights=counts) for name in inputs[0]}


def assert_fedavg(result: Mapping[str, np.ndarray], inputs: list, counts: list[int], kept: list[int]) -> None:
    """The secure average of the kept clients equals their float FedAvg to within the quantizer's bound."""
    largest = max(float(np.abs(flatten(weights)).max()) for weights in inputs)
    bound = Quantizer(len(inputs), largest, 32, max(counts)).error_bound / sum(counts[u] for u in kept)
    expected = fedavg64([inputs[u] for u in kept], [counts[u] for u in kept])
    assert list(result) == list(expected)
    for name in expected:
        assert np.abs(result[name] - expected[name]).max() <= bound


def model_inputs(n: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(seed)
    inputs = [{"w": rng.normal(0, 0.5, (4, 3)), "b": rng.normal(0, 0.1, 3)} for _ in range(n)]
    return inputs, [int(c) for c in rng.integers(1, 500, n)]


@FAST
@given(seed=st.integers(0, 2**32), n=st.integers(2, 6))
def test_secure_average_equals_fedavg_within_the_quantization_bound(seed: int, n: int) -> None:
    inputs, counts = model_inputs(n, seed)
    threshold = n // 2 + 1
    assert_fedavg(simulate(inputs, counts, threshold=threshold, seed=seed), inputs, counts, list(range(n)))


def test_float32_inputs_come_back_as_float32() -> None:
    inputs = [{"w": np.full(3, v, np.float32)} for v in (0.25, 0.75)]
    result = simulate(inputs, [1, 3], threshold=2, seed=0)
    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], 0.625, rtol=1e-6)


# Dropouts and the threshold


@pytest.mark.parametrize(
    ("drops", "kept"), [({1: 2}, [0, 1, 2, 3, 4]), ({1: 1, 3: 1}, [0, 2, 4]), ({4: 0}, [0, 1, 2, 3])]
)
def test_dropouts_are_recovered_from_the_survivors_shares(drops: dict[int, int], kept: list[int]) -> None:
    inputs, counts = model_inputs(5, 2)
    result = simulate(inputs, counts, threshold=3, seed=0, drop_after_round=drops)
    assert_fedavg(result, inputs, counts, kept)


def test_too_few_survivors_fail_the_round_before_any_unmasking() -> None:
    inputs, counts = model_inputs(5, 3)
    with pytest.raises(SecAggError, match="^2 clients sent masked inputs, threshold is 3$"):
        simulate(inputs, counts, threshold=3, seed=0, drop_after_round={0: 1, 1: 1, 2: 1})


def test_too_few_unmasking_shares_fail_the_round() -> None:
    inputs, counts = model_inputs(5, 3)
    with pytest.raises(
        SecAggError, match="^cannot rebuild the self-mask seed of client 0: 2 shares are fewer than the threshold of 3$"
    ):
        simulate(inputs, counts, threshold=3, seed=0, drop_after_round={0: 2, 1: 2, 2: 2})


def test_a_client_reveals_nothing_when_too_few_survived() -> None:
    clients, _, forwarded = shared_round(make_config(5, 3, 2))
    clients[0].mask_input(forwarded[0], np.zeros(2), 1)
    with pytest.raises(SecAggError, match="^2 clients of client 0's neighbourhood survived, threshold is 3$"):
        clients[0].unmask(UnmaskRequest((0, 1), (2, 3, 4)))


# The privacy invariant: never both shares of one client


def test_a_request_naming_a_client_as_survivor_and_dropped_cannot_be_built() -> None:
    with pytest.raises(ProtocolError, match=r"^unmask request lists clients \[2\] both as survivors and as dropped$"):
        UnmaskRequest((0, 1, 2), (2,))


def test_a_client_answers_one_unmask_request_only() -> None:
    clients, server, forwarded = shared_round(make_config(3, 2, 2))
    masked = [c.mask_input(forwarded[u], np.zeros(2), 1) for u, c in enumerate(clients)]
    reply = clients[0].unmask(server.receive_masked_inputs(masked))
    assert set(reply.seed_shares) == {0, 1, 2} and not reply.key_shares
    # A second request that claims client 2 dropped would draw its key share too: refused.
    with pytest.raises(ConfigError, match="^client 0 cannot unmask while its state is done$"):
        clients[0].unmask(UnmaskRequest((0, 1), (2,)))


def test_shares_of_both_secrets_of_one_client_cannot_be_sent() -> None:
    share = bytes(SHARE_SIZE)
    with pytest.raises(ProtocolError, match=r"^client 0 revealed both shares of clients \[1\]$"):
        UnmaskShares(0, {1: share}, {1: share})


def test_a_client_listed_as_dropped_refuses_to_unmask() -> None:
    config = make_config(3, 2, 2)
    clients, _, forwarded = shared_round(config)
    clients[0].mask_input(forwarded[0], np.zeros(2), 1)
    with pytest.raises(ProtocolError, match="^unmask request does not list client 0 among the survivors$"):
        clients[0].unmask(UnmaskRequest((1, 2), (0,)))


def test_shares_are_sealed_for_their_recipient() -> None:
    clients, _, forwarded = shared_round(make_config(3, 2, 2))
    # The server hands client 1's ciphertext for client 2 to client 0 instead: it does not decrypt.
    misrouted = ForwardedShares({1: forwarded[2].ciphertexts[1], 2: forwarded[0].ciphertexts[2]})
    with pytest.raises(ProtocolError, match="^shares from client 1 to client 0 do not decrypt$"):
        clients[0].mask_input(misrouted, np.zeros(2), 1)
    tampered = bytearray(forwarded[1].ciphertexts[0])
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError, match="^shares from client 0 to client 1 do not decrypt$"):
        clients[1].mask_input(ForwardedShares({0: bytes(tampered), 2: forwarded[1].ciphertexts[2]}), np.zeros(2), 1)


# SecAgg+: a sparse neighbour graph


def test_sparse_neighbour_graph_aggregates_with_dropouts() -> None:
    n, k = 10, 4
    inputs, counts = model_inputs(n, 4)
    config = make_config(n, 3, 3, neighbours=k)
    clients = [SecAggClient(config, u) for u in range(n)]
    keys = SecAggServer(config).receive_keys([c.advertise_keys() for c in clients])
    assert all(len(keys[u].c_public) == k for u in range(n))  # each client talks to k others, not n - 1
    result = simulate(inputs, counts, threshold=3, neighbours=k, seed=5, drop_after_round={2: 1, 7: 2})
    assert_fedavg(result, inputs, counts, [u for u in range(n) if u != 2])


# Messages from peers


def test_messages_are_validated_on_construction() -> None:
    with pytest.raises(ProtocolError, match="^encryption public key must be 32 bytes"):
        AdvertiseKeys(0, b"short", bytes(32))
    with pytest.raises(ProtocolError, match="^masked input must be a one-dimensional int32 or int64 array$"):
        MaskedInput(0, np.zeros(3, np.uint32))
    with pytest.raises(ProtocolError, match=f"^ciphertext of client 1 must be {CIPHERTEXT_SIZE} bytes"):
        ForwardedShares({1: b"x"})
    with pytest.raises(ProtocolError, match="^survivors lists a client twice$"):
        UnmaskRequest([1, 1], [])


def test_server_refuses_duplicate_and_unknown_clients() -> None:
    config = make_config(3, 2, 2)
    adverts = [SecAggClient(config, u).advertise_keys() for u in range(3)]
    with pytest.raises(ProtocolError, match="^client 1 sent keys twice$"):
        SecAggServer(config).receive_keys([*adverts, adverts[1]])
    with pytest.raises(ProtocolError, match="^client 5 sent keys but is not in this step of the round$"):
        SecAggServer(config).receive_keys([*adverts, AdvertiseKeys(5, bytes(32), bytes(32))])


def test_a_vector_of_the_wrong_length_is_refused() -> None:
    clients, _, forwarded = shared_round(make_config(3, 2, 2))
    with pytest.raises(ConfigError, match=r"^vector of shape \(3,\) does not have the round's length 2$"):
        clients[0].mask_input(forwarded[0], np.zeros(3), 1)


def test_a_600k_value_model_for_three_clients_is_fast() -> None:
    rng = np.random.default_rng(0)
    inputs = [{"w": rng.normal(0, 0.1, 600_000)} for _ in range(3)]
    start = time.perf_counter()
    result = simulate(inputs, [100, 200, 300], threshold=2, seed=0)
    elapsed = time.perf_counter() - start
    print(f"secure aggregation of 3 x 600k values: {elapsed:.3f} s")
    assert_fedavg(result, inputs, [100, 200, 300], [0, 1, 2])
    assert elapsed < 10.0


def test_masks_applied_block_by_block_match_whole_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(3, 2, 50, max_count=10)
    rng = np.random.default_rng(6)
    vectors = [rng.uniform(-1, 1, 50) for _ in range(3)]
    whole, expected = run_round(config, vectors, [1, 2, 3], drop_after={2: 1}, seed=9)
    monkeypatch.setattr(secagg, "_BLOCK", 7)  # 51 ring elements: seven full blocks and a partial one
    blocks, result = run_round(config, vectors, [1, 2, 3], drop_after={2: 1}, seed=9)
    np.testing.assert_array_equal(blocks[0].vector, whole[0].vector)
    np.testing.assert_array_equal(result.total, expected.total)
