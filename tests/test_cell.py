"""The static analysis of ``%%gpufunc`` cells and their execution on the slice's side."""

from __future__ import annotations

import json
import pickle
import sys
import traceback

import pytest

from mig_kernel.jupyter.cell import (
    CellInputs,
    CellOutcome,
    CellPlan,
    plan_cell,
    run_cell,
    select_inputs,
)


def names(source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of a cell, the pair most tests check."""
    plan = plan_cell(source)
    return plan.inputs, plan.outputs


def run(source: str, filename: str = "<cell-test>", **inputs: object) -> tuple:
    """Plan and run a cell the way the magic does, inputs given by name; returns (outputs,
    the shown value or None, unbound names)."""
    plan = plan_cell(source, filename)
    return unpack(
        run_cell(
            plan.source,
            plan.filename,
            dict(inputs),
            plan.outputs,
            plan.last_expression,
            deleted=plan.deleted,
        )
    )


def unpack(outcome: CellOutcome) -> tuple:
    return dict(outcome.outputs), outcome.shown.get("value"), outcome.unbound


# --- inputs and outputs ------------------------------------------------------------------------


def test_simple_read_and_assign() -> None:
    assert names("y = x * 2") == (("x",), ("y",))


def test_a_name_read_before_its_own_binding_is_an_input() -> None:
    assert names("y = y + 1\nx += 1") == (("y", "x"), ("y", "x"))


def test_a_name_certainly_bound_before_reading_is_not_an_input() -> None:
    assert names("a = 1\nb = a") == ((), ("a", "b"))
    assert names("import numpy as np\nz = np.ones(3)") == ((), ("z",))
    assert names("def f():\n    return 1\ng = f()") == ((), ("f", "g"))


def test_a_name_bound_only_inside_a_compound_statement_is_an_input_after_it() -> None:
    assert names("if flag:\n    a = 1\nb = a") == (("flag", "a"), ("a", "b"))
    assert names("for i in range(3):\n    last = i\nprint(last)")[0] == ("range", "print", "last")


def test_names_bound_earlier_in_the_same_block_or_by_the_statement_itself_are_not_inputs() -> None:
    source = "for i in items:\n    j = i\n    print(j)\nwith open(p) as fh:\n    text = fh.read()"
    assert names(source) == (("items", "print", "open", "p"), ("i", "j", "fh", "text"))


def test_function_parameters_and_locals_are_not_inputs_but_its_globals_are() -> None:
    source = "def f(p, *args, k=default, **kw):\n    local = p + scale\n    return local, args, kw"
    assert names(source) == (("default", "scale"), ("f",))


def test_a_function_body_counts_as_read_where_it_is_defined() -> None:
    assert names("scale = 2\ndef f(v):\n    return v * scale")[0] == ()
    assert names("def f(v):\n    return v * scale\nscale = 2")[0] == ("scale",)


def test_closure_variables_are_not_inputs() -> None:
    source = "def outer():\n    n = 1\n    def inner():\n        return n + m\n    return inner"
    assert names(source) == (("m",), ("outer",))


def test_lambda_and_comprehension_variables_are_not_inputs() -> None:
    source = "h = lambda t: t * k\ntotal = sum([i * w for i in data if i > lo])"
    assert names(source) == (("k", "sum", "data", "lo", "w"), ("h", "total"))


def test_nested_comprehensions_and_generator_expressions() -> None:
    source = "pairs = {a: b for a in xs for b in range(a)}\ngen = (c + d for c in ys)"
    assert names(source) == (("xs", "range", "ys", "d"), ("pairs", "gen"))


def test_a_lambda_inside_a_comprehension_sees_its_variable() -> None:
    """Python 3.12 inlined comprehensions: the lambda's table moved, the answer must not."""
    assert names("fs = [lambda: i + k for i in r]") == (("r", "k"), ("fs",))


@pytest.mark.skipif(sys.version_info < (3, 12), reason="type parameter syntax is Python 3.12+")
def test_type_parameters_are_not_inputs() -> None:
    source = (
        "def first[T](items: list[T]) -> T:\n    return items[offset]\n"
        "class Box[V](Base[V]):\n    item: V\n"
        "type Pair[K] = tuple[K, K] | Other\n"
    )
    assert names(source) == (("list", "offset", "Base", "tuple", "Other"), ("first", "Box", "Pair"))


def test_a_comprehension_variable_does_not_hide_the_module_name_outside_it() -> None:
    assert names("squares = [i * i for i in range(3)]\nprint(i)")[0] == ("range", "print", "i")


def test_class_bodies() -> None:
    source = (
        "class C(Base):\n"
        "    size = width\n"
        "    z = z\n"
        "    double = size * 2\n"
        "    def method(self, v):\n"
        "        return v + size_global\n"
        "    alias = method\n"
    )
    assert names(source) == (("Base", "width", "z", "size_global"), ("C",))


def test_a_method_does_not_see_class_names() -> None:
    assert names("class C:\n    n = 1\n    def m(self):\n        return n")[0] == ("n",)


def test_attribute_and_subscript_assignments_read_the_base_and_bind_nothing() -> None:
    assert names("a.x = 1\nb[i] = 2\nc.d[0] += 3") == (("a", "b", "i", "c"), ())


def test_walrus_in_a_comprehension_binds_at_module_level() -> None:
    assert names("found = [hit := v for v in values if v > 0]") == (
        ("values",),
        ("hit", "found"),
    )


def test_walrus_in_a_function_comprehension_stays_local() -> None:
    assert names("def f(vs):\n    return [h := v for v in vs], h") == ((), ("f",))


def test_global_in_a_function_makes_its_assignments_outputs() -> None:
    source = "def setup():\n    global counter, gone\n    counter = counter + 1\n    del gone"
    plan = plan_cell(source)
    assert (plan.inputs, plan.outputs, plan.deleted) == (
        ("counter", "gone"),
        ("setup", "counter"),
        ("gone",),
    )


def test_imports_bind_the_right_names() -> None:
    source = (
        "import os\n"
        "import os.path\n"
        "import cupy.fft as cfft\n"
        "from numpy import linalg\n"
        "from numpy.random import default_rng as rng, seed\n"
        "from . import sibling\n"
    )
    plan = plan_cell(source)
    assert (plan.inputs, plan.outputs) == ((), ())  # imports stay on the slice
    assert plan.imported == ("os", "cfft", "linalg", "rng", "seed", "sibling")


def test_a_name_both_imported_and_assigned_is_an_output() -> None:
    plan = plan_cell("from functools import partial\npartial = partial(print, 1)\nimport os")
    assert (plan.outputs, plan.imported) == (("partial",), ("os",))
    plan = plan_cell("def f():\n    global np\n    import numpy as np\nf()")
    assert (plan.outputs, plan.imported) == (("f",), ("np",))


def test_a_star_import_cannot_be_analysed() -> None:
    with pytest.raises(ValueError, match=r"from numpy import \* cannot be analysed \(line 2\)"):
        plan_cell("x = 1\nfrom numpy import *")


def test_xp_is_neither_input_nor_output() -> None:
    plan = plan_cell("a = xp.arange(n)\nxp = None\ndel xp")
    assert (plan.inputs, plan.outputs, plan.deleted) == (("n",), ("a",), ())


def test_del_records_the_name_and_reads_it_when_not_bound_before() -> None:
    plan = plan_cell("del old\nnew = 1\ndel new")
    assert (plan.inputs, plan.outputs, plan.deleted) == (("old",), ("new",), ("old", "new"))


def test_except_as_match_and_for_targets_bind() -> None:
    source = (
        "try:\n    f()\nexcept KeyError as err:\n    pass\n"
        "match cmd:\n    case [first, *rest]:\n        pass\n    case {'k': v, **others}:\n"
        "        pass\n"
        "for key, (val, *more) in table:\n    pass\n"
    )
    assert names(source)[1] == ("err", "first", "rest", "v", "others", "key", "val", "more")


def test_annotations_alone_bind_nothing() -> None:
    assert names("width: int\nheight: int = 3") == (("int",), ("height",))


# --- last expression and errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("x = 1\nx", True),
        ("x + 1  # a comment; with a semicolon", True),
        ("x;", False),
        ("x;  # suppressed", False),
        ("x;\n\n# trailing comment\n", False),
        ("x = 1", False),
        ("for i in r:\n    i", False),
        ("s = ';'\ns", True),
        ("", False),
    ],
)
def test_last_expression_follows_ipythons_semicolon_rule(source: str, shown: bool) -> None:
    assert plan_cell(source).last_expression is shown


def test_a_syntax_error_carries_filename_and_line() -> None:
    with pytest.raises(SyntaxError) as caught:
        plan_cell("a = 1\nb = (\n", "<gpufunc-7>")
    assert caught.value.filename == "<gpufunc-7>"
    assert caught.value.lineno == 2


def test_compiler_errors_are_raised_before_anything_is_sent() -> None:
    with pytest.raises(SyntaxError, match="'return' outside function") as caught:
        plan_cell("x = 1\nreturn x", "<gpufunc-8>")
    assert (caught.value.filename, caught.value.lineno) == ("<gpufunc-8>", 2)


def test_plan_keeps_source_and_filename() -> None:
    plan = plan_cell("y = x", "<gpufunc-3>")
    assert plan == CellPlan("y = x", "<gpufunc-3>", ("x",), ("y",), (), False)


# --- select_inputs -----------------------------------------------------------------------------


def test_select_inputs_ships_only_present_unhidden_names() -> None:
    plan = plan_cell("y = x + z + print(Out) + xp.pi + missing")
    namespace = {"x": 1, "z": 2, "Out": {}, "xp": object(), "unused": 3}
    assert select_inputs(plan, namespace, hidden={"Out"}) == {"x": 1, "z": 2}
    assert list(select_inputs(plan, namespace)) == ["x", "z", "Out"]


# --- run_cell ----------------------------------------------------------------------------------


def test_run_cell_returns_outputs_value_and_unbound_names() -> None:
    bound, value, unbound = run("del stale\ntotal = sum(values)\ntotal * 2", values=[1, 2], stale=0)
    assert (bound, value, unbound) == ({"total": 3}, 6, ("stale",))


def test_run_cell_without_last_expression_returns_none() -> None:
    assert run("y = x + 1\ny;", x=1) == ({"y": 2}, None, ())


def test_run_cell_reports_an_output_that_ends_unbound() -> None:
    bound, _, unbound = run("try:\n    1 / 0\nexcept ZeroDivisionError as err:\n    caught = 1")
    assert (bound, unbound) == ({"caught": 1}, ("err",))


def test_run_cell_provides_xp_and_a_fresh_namespace() -> None:
    outcome = run_cell("n = xp.dumps([1])\n__name__", "<x>", {}, ("n",), True, xp=json)
    assert unpack(outcome)[:2] == ({"n": "[1]"}, "__gpufunc__")


def test_a_shipped_builtins_cannot_replace_the_slices() -> None:
    outcome = run_cell("len('ab')", "<b>", {"__builtins__": {}}, (), True)
    assert outcome.shown == {"value": 2}


def test_a_none_value_is_not_shown() -> None:
    assert run_cell("print", "<n>", {}, (), True).shown == {"value": print}
    assert run_cell("None", "<n>", {}, (), True).shown == {}


def test_functions_defined_in_a_cell_see_its_namespace() -> None:
    bound, value, _ = run("def f(v):\n    return v * k\nf(3)", k=2)
    assert value == 6
    assert bound["f"](4) == 8


def test_imported_names_and_module_values_do_not_come_back(capsys) -> None:
    """The slice's modules are not the notebook's: names bound by import stay on the slice,
    an assigned name whose value is a module is not written back either, and a module as the
    last expression is printed (it cannot come back)."""
    outputs, value, unbound = run("import json\nimport os.path as osp\nalias = json\nn = 1\nosp")
    assert (outputs, value, unbound) == ({"n": 1}, None, ())
    assert capsys.readouterr().out.startswith("<module 'posixpath'")
    assert run("json.dumps(1)", json=json)[1] == "1"  # a module input is used as it is


def test_an_exception_propagates_with_the_cells_lines_in_its_traceback() -> None:
    source = "a = 1\nb = a / zero\n"
    with pytest.raises(ZeroDivisionError) as caught:
        run(source, "<gpufunc-11>", zero=0)
    text = "".join(traceback.format_exception(caught.value))
    assert 'File "<gpufunc-11>", line 2, in <module>' in text
    assert "b = a / zero" in text


def test_an_error_in_the_last_expression_reports_its_line() -> None:
    source = "a = 1\n\nb = 2\n(a +\n undefined_name)"
    with pytest.raises(NameError, match="undefined_name") as caught:
        run(source, "<gpufunc-12>")
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert (frames[-1].filename, frames[-1].lineno) == ("<gpufunc-12>", 5)
    assert "undefined_name" in "".join(traceback.format_exception(caught.value))


# --- what crosses ------------------------------------------------------------------------------


def test_cell_inputs_and_outcomes_pickle_by_reference() -> None:
    inputs = CellInputs({"x": [1, 2]})
    assert pickle.loads(pickle.dumps(inputs)) == inputs
    outcome = CellOutcome({"y": 1}, {"value": 2}, ("z",))
    assert pickle.loads(pickle.dumps(outcome)) == outcome
