"""Injected hanging / failing verifiers: cut off within the timeout, counted, never stalling a batch.

The verify functions live here at module level so they pickle into the worker processes, and this
module imports no pytest so that each (re)started worker imports it quickly.
"""

import os
import time

from holderpo_megatron.rewards import MathReward, TimeoutPool


def hang_forever(pred, golds):
    time.sleep(3600)
    return True


def hang_on_marker(pred, golds):
    if pred == "HANG":
        time.sleep(3600)
    return pred in golds


def raise_on_marker(pred, golds):
    if pred == "BOOM":
        raise RuntimeError("verifier exploded")
    return pred in golds


def test_hanging_calls_are_cut_off_within_timeout_and_workers_replaced():
    timeout = 1.0
    with TimeoutPool(hang_on_marker, workers=2, timeout_s=timeout) as pool:
        pool.map([("warm", ["warm"])] * 2)
        outs = pool.map([("HANG", ["x"]), ("a", ["a"]), ("HANG", ["x"]), ("b", ["c"])])
        assert [o.status for o in outs] == ["timeout", "ok", "timeout", "ok"]
        assert [o.value for o in outs if o.status == "ok"] == [True, False]
        for o in outs:
            if o.status == "timeout":
                assert timeout <= o.seconds < timeout + 1.0, o.seconds
        assert pool.restarts == 2
        # The replacement workers serve the next call.
        assert [o.value for o in pool.map([("z", ["z"])])] == [True]


def test_every_item_hanging_never_stalls_the_batch():
    timeout = 1.0
    with MathReward(timeout_s=timeout, workers=2, verify_fn=hang_forever) as reward:
        t0 = time.monotonic()
        res = reward.score([rf"\boxed{{{i}}}" for i in range(4)], [["x"]] * 4)
        wall = time.monotonic() - t0
    assert res.rewards == [0.0] * 4
    assert res.outcomes == ["timeout"] * 4
    assert res.stats["timeout"] == 4 and res.stats["worker_restarts"] == 4
    # 4 hanging items on 2 workers: two rounds of the timeout, plus worker start-ups.
    assert 2 * timeout <= wall < 2 * timeout + 10.0, wall


def test_a_batch_time_budget_bounds_the_whole_batch(caplog):
    # 20 hanging answers on 2 workers would take 10 timeouts; a 2.5 s budget stops after about 3
    timeout, budget = 1.0, 2.5
    with MathReward(timeout_s=timeout, workers=2, verify_fn=hang_forever, batch_timeout_s=budget) as reward:
        t0 = time.monotonic()
        res = reward.score([rf"\boxed{{{i}}}" for i in range(20)] + [r"\boxed{7}"], [["x"]] * 20 + [["7"]])
        wall = time.monotonic() - t0
    assert res.outcomes == ["timeout"] * 20 + ["correct"]  # the string match needs no verifier
    assert res.stats["timeout"] == 20 and res.stats["over_budget"] >= 10
    assert res.stats["verified"] == 20 - res.stats["over_budget"]
    assert wall < budget + timeout + 5.0, wall  # + worker restarts
    assert "time budget (batch_timeout_s=2 s) ran out" in caplog.text and "score as timeouts" in caplog.text


def test_verifier_errors_are_counted_not_swallowed():
    with MathReward(timeout_s=10.0, workers=1, verify_fn=raise_on_marker) as reward:
        res = reward.score([r"\boxed{BOOM}", r"\boxed{ok}", r"\boxed{no}"], [["x"], ["ok"], ["x"]])
    assert res.outcomes == ["error", "correct", "wrong"]
    assert res.stats["error"] == 1 and "verifier exploded" in res.stats["error_examples"][0]


def test_unpicklable_verify_fn_fails_at_construction():
    try:
        TimeoutPool(lambda p, g: True, workers=1, timeout_s=1.0)
    except Exception as exc:  # pickle.PicklingError or AttributeError, by Python version
        assert "lambda" in str(exc) or "pickle" in type(exc).__name__.lower(), exc
    else:
        raise AssertionError("a lambda cannot travel to a worker process; the pool must refuse it")


def test_closed_pool_refuses_work():
    pool = TimeoutPool(hang_on_marker, workers=1, timeout_s=1.0)
    pool.close()
    pool.close()  # idempotent
    try:
        pool.map([("a", ["a"])])
    except RuntimeError as exc:
        assert "close" in str(exc)
    else:
        raise AssertionError("map after close must raise")


def die_on_marker(pred, golds):
    if pred == "DIE":
        os._exit(3)  # a crash the worker cannot report (segfault, OOM kill)
    return pred in golds


def broken_initializer():
    raise ImportError("verifier backend missing")


def test_worker_crash_is_an_error_and_the_worker_is_replaced():
    with TimeoutPool(die_on_marker, workers=1, timeout_s=10.0) as pool:
        outs = pool.map([("DIE", ["x"]), ("a", ["a"])])
        assert outs[0].status == "error" and "exit code 3" in outs[0].error
        assert outs[1].status == "ok" and outs[1].value is True
        assert pool.restarts == 1


def test_worker_that_cannot_start_raises():
    with TimeoutPool(die_on_marker, workers=1, timeout_s=1.0, initializer=broken_initializer) as pool:
        try:
            pool.map([("a", ["a"])])
        except RuntimeError as exc:
            assert "start-up" in str(exc)
        else:
            raise AssertionError("a worker that cannot start must raise, not stall")
