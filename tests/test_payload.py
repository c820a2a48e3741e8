"""The client's cache of pickled functions: a function called again is not pickled again, and
never reuses bytes that a fresh pickle would no longer produce."""

from __future__ import annotations

import os
import sys
import types

import cloudpickle
import pytest

from mig_kernel.jupyter.cell import run_on_slice
from mig_kernel.wire import payload

SCALE = 2
CONFIG = {"scale": 2}


@pytest.fixture
def counted(monkeypatch):
    """A cache whose misses are counted (each miss pickles the function)."""
    misses: list[object] = []
    real = payload.dumps_function

    def counting(fn: object) -> bytes:
        misses.append(fn)
        return real(fn)

    monkeypatch.setattr(payload, "dumps_function", counting)
    return payload.FunctionPickles(), misses


def run(data: bytes, *args: object) -> object:
    return cloudpickle.loads(data)(*args)


def test_a_function_called_again_is_pickled_once(counted) -> None:
    cache, misses = counted

    def fn(x):
        return x * SCALE + len(os.sep)

    first = cache.dumps(fn)
    assert cache.dumps(fn) is first and len(misses) == 1
    assert run(first, 3) == 7


def test_a_changed_global_repickles(counted) -> None:
    cache, misses = counted
    global SCALE
    fn = types.FunctionType((lambda x: x * SCALE).__code__, globals())
    before = cache.dumps(fn)
    SCALE = 5
    try:
        after = cache.dumps(fn)
        assert run(after, 2) == 10 and run(before, 2) == 4 and len(misses) == 2
    finally:
        SCALE = 2


def test_equal_but_different_values_repickle(counted) -> None:
    cache, _ = counted
    holder = {"k": 1}

    def make():
        k = holder["k"]
        return lambda: k

    fn = make()
    assert run(cache.dumps(fn)) == 1
    fn.__closure__[0].cell_contents = 1.0  # equal to 1, but a float
    again = run(cache.dumps(fn))
    assert again == 1.0 and type(again) is float


def test_mutable_captures_are_never_cached(counted) -> None:
    cache, misses = counted

    def fn():
        return CONFIG["scale"]

    assert run(cache.dumps(fn)) == 2
    CONFIG["scale"] = 3
    try:
        assert run(cache.dumps(fn)) == 3 and len(misses) == 2
    finally:
        CONFIG["scale"] = 2


def test_closures_defaults_and_attributes(counted) -> None:
    cache, misses = counted

    def outer(n):
        def inner(x, y=10, *, z=1):
            return x + n + y + z

        return inner

    fn = outer(1)
    assert run(cache.dumps(fn), 0) == 12
    fn.__defaults__ = (20,)
    assert run(cache.dumps(fn), 0) == 22
    fn.__kwdefaults__["z"] = 5
    assert run(cache.dumps(fn), 0) == 26
    fn.__closure__[0].cell_contents = 100
    assert run(cache.dumps(fn), 0) == 125
    fn.tag = "x"  # function attributes: never cached
    cache.dumps(fn)
    cache.dumps(fn)
    assert len(misses) == 6


def test_helper_functions_are_not_cached(counted) -> None:
    cache, misses = counted

    def helper():
        return 1

    def fn():
        return helper()

    cache.dumps(fn)
    cache.dumps(fn)
    assert len(misses) == 2


def test_functions_by_reference_are_cached_while_their_name_resolves(counted) -> None:
    cache, misses = counted
    data = cache.dumps(run_on_slice)
    assert cache.dumps(run_on_slice) is data and len(misses) == 1
    module = sys.modules[run_on_slice.__module__]
    original = module.run_on_slice
    module.run_on_slice = lambda *a: None  # the name no longer names this function
    try:
        cache.dumps(run_on_slice)
        assert len(misses) == 2
    finally:
        module.run_on_slice = original


def test_a_module_import_since_repickles_functions_that_use_modules(counted) -> None:
    cache, misses = counted

    def fn():
        return os.path.join("a", "b")

    cache.dumps(fn)
    cache.dumps(fn)
    assert len(misses) == 1
    name = "mig_kernel_test_payload_fake_module"
    sys.modules[name] = types.ModuleType(name)
    try:
        cache.dumps(fn)
        assert len(misses) == 2
    finally:
        del sys.modules[name]


def test_the_empty_arguments_are_the_pickle_of_no_arguments() -> None:
    assert payload.loads(payload.EMPTY_ARGS, lambda pid: None) == ((), {})


def test_a_global_defined_later_repickles(counted) -> None:
    cache, _ = counted
    fn = types.FunctionType(compile("lambda: LATER", "<cell>", "eval").co_consts[0], {})
    with pytest.raises(NameError):
        run(cache.dumps(fn))
    fn.__globals__["LATER"] = 7
    assert run(cache.dumps(fn)) == 7


def test_new_lambdas_of_the_same_code_reuse_the_pickle(counted) -> None:
    cache, misses = counted
    made = [lambda a: a * SCALE for _ in range(3)]  # three function objects, one code object
    first = cache.dumps(made[0])
    assert all(cache.dumps(fn) is first for fn in made[1:]) and len(misses) == 1
    assert run(first, 4) == 8


def test_a_lambda_closing_over_another_value_is_pickled_afresh(counted) -> None:
    cache, misses = counted

    def scaler(k: int):
        return lambda a: a * k

    by_two, by_three = scaler(2), scaler(3)
    assert by_two.__code__ is by_three.__code__
    two, three = cache.dumps(by_two), cache.dumps(by_three)
    assert len(misses) == 2 and run(two, 5) == 10 and run(three, 5) == 15
    assert cache.dumps(scaler(3)) == three and len(misses) == 2  # same code, same value
