"""Bucketing, the exactly-once ledger, the factory's argument checks: no engine, no Megatron.
(Transport choice by topology: test_weight_sync_factory.py.)"""

import pytest
import torch

from holderpo_megatron.rollout.shared_memory import dumps_shared, loads_shared
from holderpo_megatron.weight_sync import SyncLedger, make_weight_synchronizer
from holderpo_megatron.weight_sync.base import with_last
from holderpo_megatron.weight_sync.buckets import BucketBuffer, group_into_buckets, pack_bucket, share_all


def _tensors():
    return [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(10)), ("c", torch.full((4,), 7.0)),
            ("d", torch.randn(3, 3))]


@pytest.mark.parametrize("bucket_bytes,want", [
    (1, [["a"], ["b"], ["c"], ["d"]]),          # smaller than any tensor: one tensor per bucket
    (64, [["a", "b"], ["c", "d"]]),             # 24 + 40 fits, + 16 would not; 16 + 36 fits
    (1 << 30, [["a", "b", "c", "d"]]),          # larger than everything: one bucket
])
def test_grouping_respects_the_budget_and_keeps_order(bucket_bytes, want):
    got = [[n for n, _ in g] for g in group_into_buckets(_tensors(), bucket_bytes)]
    assert got == want


def test_with_last_flags_only_the_last_item_and_reads_one_ahead():
    assert list(with_last([])) == [] and list(with_last("a")) == [("a", True)]
    taken = []

    def groups():  # the owner lists bucket k+1 before handing out bucket k, never further
        for k in range(3):
            taken.append(k)
            yield k

    it = with_last(groups())
    assert next(it) == (0, False) and taken == [0, 1]
    assert next(it) == (1, False) and taken == [0, 1, 2]
    assert next(it) == (2, True) and list(it) == []


def test_packed_bucket_views_round_trip_and_the_buffer_is_reused():
    buf = BucketBuffer()
    b = pack_bucket(_tensors(), buf)
    assert b.nbytes == (6 + 10 + 4 + 9) * 4 and [m.offset for m in b.metas] == [0, 24, 64, 80]
    for (name, t), (n2, v) in zip(_tensors()[:3], b.tensors()[:3]):
        assert name == n2 and torch.equal(t, v)
    first = buf.get(1).data_ptr()
    pack_bucket(_tensors()[:2], buf)
    assert buf.get(1).data_ptr() == first
    with pytest.raises(ValueError, match="one dtype"):
        pack_bucket([("x", torch.zeros(2)), ("y", torch.zeros(2, dtype=torch.bfloat16))], buf)


def test_shared_bucket_travels_as_a_handle_without_copying():
    buf = BucketBuffer(shared=True)
    b = pack_bucket(_tensors(), buf)
    payload = dumps_shared(b)
    assert len(payload) < 4096  # a handle, not the data
    other = loads_shared(payload)
    assert [m.name for m in other.metas] == ["a", "b", "c", "d"]
    other.buffer[0:4].view(torch.float32).fill_(42.0)  # same memory
    assert b.tensors()[0][1][0, 0].item() == 42.0


def test_ledger_counts_each_tensor_exactly_once():
    expected = {"a": (2, 3), "b": (10,)}
    ledger = SyncLedger(expected, torch.float32)
    b = pack_bucket(_tensors()[:2], BucketBuffer())
    ledger.add_bucket(b.metas)
    ledger.check_complete()
    assert ledger.bytes == ledger.expected_bytes == 64 and ledger.buckets == 1
    with pytest.raises(AssertionError, match="sent 'a' twice"):
        ledger.add(b.metas[0])
    fresh = SyncLedger(expected, torch.float32)
    fresh.add(b.metas[0])
    with pytest.raises(AssertionError, match="did not send 'b'"):
        fresh.check_complete()
    with pytest.raises(AssertionError, match="'c', which is not an HF tensor"):
        fresh.add(pack_bucket(_tensors()[2:3], BucketBuffer()).metas[0])
    with pytest.raises(AssertionError, match="as torch.bfloat16, the engine holds torch.float32"):
        SyncLedger({"x": (2,)}, torch.float32).add(
            pack_bucket([("x", torch.zeros(2, dtype=torch.bfloat16))], BucketBuffer()).metas[0])


def test_factory_errors():
    from holderpo_megatron.weight_sync import MegatronWeightSource, StateDictSource

    src = StateDictSource({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="transport='nccl2' is invalid; allowed: 'auto' | 'tensor'"):
        make_weight_synchronizer(src, object(), dtype=torch.float32, transport="nccl2")
    with pytest.raises(ValueError, match="the owner rank .* must hold the engine"):
        make_weight_synchronizer(src, None, dtype=torch.float32)
    with pytest.raises(ValueError, match="bucket_bytes=0 is invalid"):
        make_weight_synchronizer(src, None, dtype=torch.float32, bucket_bytes=0)
    with pytest.raises(ValueError, match="tp_gather='nvlink' is invalid; allowed: 'auto' | 'shared' | 'p2p'"):
        MegatronWeightSource(None, None, tp_gather="nvlink")


def test_share_all_moves_cpu_storages_in_place_once():
    t = torch.arange(6.0)
    view = t[2:4]
    share_all([view])  # a view moves its whole storage; the base sees the same memory
    assert t.untyped_storage().is_shared() and view.data_ptr() == t.data_ptr() + 8
    ptr = t.data_ptr()
    share_all([t])  # already shared: left where it is
    t[3] = 7.0
    assert t.data_ptr() == ptr and view[1].item() == 7.0
