"""What a ``%%gpufunc`` cell reads and binds, and how the slice runs it.

The kernel must not ship the whole notebook namespace to the executor, so it decides statically
which notebook names a cell may read (its inputs) and which module-level names it binds (its
outputs). The analysis errs one way only: a name that might be read from the notebook is an
input (``select_inputs`` then ships only those the notebook holds, so builtins and misses fall
away), while a name the cell is sure to have bound before reading it is not shipped at all.
Scopes of functions, lambdas and classes come from ``symtable``, the compiler's own analysis, so
a parameter or local never counts as an input. Comprehensions are analysed here, because Python
3.12 inlined them and ``symtable`` stopped describing them as scopes of their own.

Only the names are returned: an input changed in place on the slice (``a[0] = 1``) stays as it
was in the notebook unless the cell binds the name again.

What comes back (README, "%%gpufunc"): names the cell assigns (``=``, ``+=``, ``def``,
``class``, ``for``, ``with ... as``, ``except ... as``, ``:=``, ``match``, ``global`` in a
function), unless their value is a module; names bound only by ``import`` stay on the slice (the
slice's modules are not the notebook's, and a CuPy module may not even import in the kernel);
names the cell deletes, or assigns and leaves unbound, are removed from the notebook.

Standard library only (``run_on_slice`` imports the wire format lazily): this module is imported
by the kernel at start and by the executor.
"""

from __future__ import annotations

import ast
import builtins
import functools
import io
import linecache
import symtable
import tokenize
import types
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

XP_NAME = "xp"  # always the slice's array module remotely; never an input or output

_COMPREHENSIONS = {
    ast.ListComp: "listcomp",
    ast.SetComp: "setcomp",
    ast.DictComp: "dictcomp",
    ast.GeneratorExp: "genexpr",
}
# Statements after which a module- or class-level name is bound for certain (when unconditional).
_DEFINITE = (
    ast.Assign,
    ast.AnnAssign,
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
)
_TYPE_ALIAS = getattr(ast, "TypeAlias", ())  # ``type X = ...``, Python 3.12
_TRIVIA = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


@dataclass(frozen=True)
class CellPlan:
    """What the kernel needs to run a cell remotely: made by ``plan_cell``, read by the magic."""

    source: str  # the Python source to run
    filename: str  # the name it is compiled under (shows in tracebacks)
    inputs: tuple[str, ...]  # names the cell may read from the notebook namespace, first-use order
    outputs: tuple[str, ...]  # names the cell assigns at module level, first-binding order
    deleted: tuple[str, ...]  # names removed by a module-level ``del NAME``
    last_expression: bool  # last statement is an expression whose value is shown
    imported: tuple[str, ...] = ()  # names bound at module level by ``import`` only


@dataclass(frozen=True)
class CellInputs:
    """The notebook values a cell reads, shipped to ``run_on_slice`` as the notebook holds
    them. Being an object rather than a plain dict matters: arrays inside an argument's lists,
    tuples and dicts are staged to the device, those inside any other object arrive as host
    arrays (remote.py), so a NumPy array stays a NumPy array and a pandas frame keeps its
    NumPy columns. ``xp.asarray(x)`` puts one on the device, as with CuPy."""

    values: dict[str, Any]


@dataclass(frozen=True)
class CellOutcome:
    """What a cell run on the slice gives back: made by ``run_cell``, read by the magic."""

    outputs: Mapping[str, Any]  # assigned names still bound, values that are not modules
    shown: Mapping[str, Any]  # {"value": the last expression's value} when it is shown, else {}
    unbound: tuple[str, ...]  # outputs and deleted names that ended unbound


def plan_cell(source: str, filename: str = "<gpufunc>") -> CellPlan:
    """Analyse a cell without running it.

    Raises ``SyntaxError`` (filename and line set) for source that does not compile, so the
    error shows in the notebook before anything is sent, and ``ValueError`` for a star import,
    whose names cannot be known without importing the module.
    """
    tree = ast.parse(source, filename)
    # The compiler's later checks too (``return`` outside a function, ...), while still local.
    compile(tree, filename, "exec", dont_inherit=True)
    analysis = _Analysis(symtable.symtable(source, filename, "exec"))
    analysis.block(tree.body, _Scope("module", None), set())
    return CellPlan(
        source=source,
        filename=filename,
        inputs=tuple(analysis.inputs),
        outputs=tuple(analysis.outputs),
        deleted=tuple(analysis.deleted),
        last_expression=_shows_last_value(source, tree),
        imported=tuple(name for name in analysis.imported if name not in analysis.outputs),
    )


def select_inputs(
    plan: CellPlan, namespace: Mapping[str, Any], hidden: Container[str] = ()
) -> dict[str, Any]:
    """The values to ship: the plan's inputs the notebook holds, less ``hidden`` (IPython's
    ``In``, ``Out``, ``_`` and the like) and ``XP_NAME``, which the slice always provides."""
    return {
        name: namespace[name]
        for name in plan.inputs
        if name != XP_NAME and name not in hidden and name in namespace
    }


def run_cell(
    source: str,
    filename: str,
    inputs: dict[str, Any],
    outputs: tuple[str, ...],
    last_expression: bool,
    xp: Any = None,
    *,
    deleted: tuple[str, ...] = (),
) -> CellOutcome:
    """Run a planned cell on the slice, in a fresh namespace made of its inputs.

    Returns the outputs it bound (but not modules: see the module docstring), the value of its
    last expression when shown, and the outputs and ``deleted`` names that ended up unbound,
    which the kernel removes from the notebook as a local run would have. A last expression
    whose value is a module is printed instead (its repr), as it cannot come back.
    Exceptions propagate unchanged; the source is put in ``linecache`` first so that their
    tracebacks show the cell's lines.
    """
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last: ast.expr | None = None
    if last_expression and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop().value
    namespace: dict[str, Any] = {"__name__": "__gpufunc__"}
    namespace.update(inputs)
    if xp is not None:
        for value in inputs.values():
            _lend_xp(value, xp)
    # Set after the inputs so that nothing shipped can replace the slice's own.
    namespace["__builtins__"] = builtins
    if xp is not None:
        namespace[XP_NAME] = xp
    # dont_inherit: this module's ``from __future__`` imports must not apply to the cell.
    exec(compile(tree, filename, "exec", dont_inherit=True), namespace)
    shown: dict[str, Any] = {}
    if last is not None:
        # The expression node keeps the positions it was parsed with, so an error in it
        # reports the cell's line, not line 1 of a separate snippet.
        expression = compile(ast.Expression(body=last), filename, "eval", dont_inherit=True)
        value = eval(expression, namespace)
        if isinstance(value, types.ModuleType):
            print(repr(value))
        elif value is not None:
            shown["value"] = value
    bound = {
        name: namespace[name]
        for name in outputs
        if name in namespace and not isinstance(namespace[name], types.ModuleType)
    }
    unbound = tuple(name for name in dict.fromkeys((*outputs, *deleted)) if name not in namespace)
    return CellOutcome(bound, shown, unbound)


def _lend_xp(value: Any, xp: Any) -> None:
    """A function defined in the notebook (``__main__``, shipped by value) sees ``xp`` on the
    slice as the cell does, if its own globals have none: design.md promises ``xp`` without an
    import inside functions, and a helper written in an ordinary cell and called by a GPU cell
    is one. Also partials of such functions and the methods of notebook classes (and of their
    instances). Only copies made on the slice are touched: an importable module's globals never
    are."""
    if isinstance(value, functools.partial):
        value = value.func
    if isinstance(value, types.FunctionType):
        functions = [value]
    else:
        cls = value if isinstance(value, type) else type(value)
        if cls.__module__ != "__main__":
            return
        functions = [f for f in vars(cls).values() if isinstance(f, types.FunctionType)]
    for function in functions:
        if function.__module__ == "__main__":
            function.__globals__.setdefault(XP_NAME, xp)


def _shows_last_value(source: str, tree: ast.Module) -> bool:
    """IPython's rule: a trailing expression is shown unless the cell's last token is ``;``.

    Tokens rather than text, so a ``;`` inside a trailing comment or string does not count.
    """
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return False
    last = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _TRIVIA:
            last = token
    return last is None or last.string != ";"


@dataclass(eq=False)
class _Scope:
    """Where a name is read or bound during the walk.

    ``kind`` is ``module``, ``class`` or ``function`` (with the ``symtable`` table, if found),
    or ``local`` for scopes analysed here: comprehensions and type parameters, whose own names
    are ``names``. ``module_bound`` is the module's certainly-bound names at the statement that
    contains this scope: the code of a function counts as read where it is defined.
    """

    kind: str
    parent: _Scope | None
    table: symtable.SymbolTable | None = None
    names: frozenset[str] = frozenset()
    module_bound: set[str] = field(default_factory=set)


class _Analysis:
    """One walk over a cell's tree, in evaluation order, collecting names in first-use order.

    ``bound`` arguments are the names certainly bound in the current module or class block at
    the current statement; a statement's own bindings join them only after its reads.
    """

    def __init__(self, table: symtable.SymbolTable) -> None:
        self.inputs: dict[str, None] = {}
        self.outputs: dict[str, None] = {}
        self.imported: dict[str, None] = {}
        self.deleted: dict[str, None] = {}
        self._table = table
        self._matched: set[int] = set()

    def block(self, body: list[ast.stmt], scope: _Scope, bound: set[str]) -> None:
        for stmt in body:
            self.statement(stmt, scope, bound)
            if scope.kind in ("module", "class") and isinstance(stmt, _DEFINITE):
                bound.update(_certainly_binds(stmt))

    def statement(self, stmt: ast.stmt, scope: _Scope, bound: set[str]) -> None:
        """Reads in the order they happen; a compound statement's blocks each start from what
        was bound before it (plus what the statement binds before entering them) and what they
        bind is forgotten after it, since a branch or loop body may not run."""
        if isinstance(stmt, (ast.If, ast.While)):
            self.expr(stmt.test, scope, bound)
            self.block(stmt.body, scope, set(bound))
            self.block(stmt.orelse, scope, set(bound))
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            self.expr(stmt.iter, scope, bound)
            self.expr(stmt.target, scope, bound)
            self.block(stmt.body, scope, bound | set(_target_names(stmt.target)))
            self.block(stmt.orelse, scope, set(bound))
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            entered: set[str] = set()
            for item in stmt.items:
                self.expr(item.context_expr, scope, bound)
                if item.optional_vars is not None:
                    self.expr(item.optional_vars, scope, bound)
                    entered.update(_target_names(item.optional_vars))
            self.block(stmt.body, scope, bound | entered)
        elif isinstance(stmt, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            self.block(stmt.body, scope, set(bound))
            for handler in stmt.handlers:
                if handler.type is not None:
                    self.expr(handler.type, scope, bound)
                caught: set[str] = set()
                if handler.name is not None:
                    self.bind(handler.name, scope)
                    caught.add(handler.name)
                self.block(handler.body, scope, bound | caught)
            self.block(stmt.orelse, scope, set(bound))
            self.block(stmt.finalbody, scope, set(bound))
        elif isinstance(stmt, ast.Match):
            self.expr(stmt.subject, scope, bound)
            for case in stmt.cases:
                self.expr(case.pattern, scope, bound)
                if case.guard is not None:
                    self.expr(case.guard, scope, bound)
                self.block(case.body, scope, set(bound))
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._function(stmt, scope, bound)
        elif isinstance(stmt, ast.ClassDef):
            self._class(stmt, scope, bound)
            self.bind(stmt.name, scope)  # after its body, which runs first
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                if alias.name == "*":
                    raise ValueError(
                        f"from {stmt.module} import * cannot be analysed (line {stmt.lineno}):"
                        " import the names the cell uses explicitly"
                    )
                self.bind(_imported_name(stmt, alias), scope, imported=True)
        elif isinstance(stmt, _TYPE_ALIAS):
            self.bind(stmt.name.id, scope)
            self.expr(stmt.value, self._type_params(stmt, scope, bound), bound)
        elif isinstance(stmt, ast.Assign):
            self.expr(stmt.value, scope, bound)
            for target in stmt.targets:
                self.expr(target, scope, bound)
        elif isinstance(stmt, ast.AugAssign):
            if isinstance(stmt.target, ast.Name):
                self.read(stmt.target.id, scope, bound)
            self.expr(stmt.target, scope, bound)
            self.expr(stmt.value, scope, bound)
        elif isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                self.expr(stmt.value, scope, bound)
            if scope.kind in ("module", "class"):  # evaluated there only, and not in functions
                self.expr(stmt.annotation, scope, bound)
            # ``x: int`` alone binds nothing; ``a.b: int`` still evaluates ``a``.
            if stmt.value is not None or not isinstance(stmt.target, ast.Name):
                self.expr(stmt.target, scope, bound)
        else:  # Expr, Return, Delete, Raise, Assert, Global, ...: just their expressions
            for child in ast.iter_child_nodes(stmt):
                self.expr(child, scope, bound)

    def expr(self, node: ast.AST, scope: _Scope, bound: set[str]) -> None:
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self.read(node.id, scope, bound)
            elif isinstance(node.ctx, ast.Del):  # ``del x`` needs x to exist
                self.read(node.id, scope, bound)
                self.bind(node.id, scope, delete=True)
            else:
                self.bind(node.id, scope)
        elif isinstance(node, ast.NamedExpr):
            self.expr(node.value, scope, bound)
            self.bind(node.target.id, scope, walrus=True)
        elif isinstance(node, ast.Lambda):
            for default in _defaults(node.args):
                self.expr(default, scope, bound)
            inner = self._nested(scope, "function", bound, self._find(scope, node, "lambda"))
            self.expr(node.body, inner, set())
        elif isinstance(node, tuple(_COMPREHENSIONS)):
            self._comprehension(node, scope, bound)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
            for child in ast.iter_child_nodes(node):
                self.expr(child, scope, bound)
            name = node.rest if isinstance(node, ast.MatchMapping) else node.name
            if name is not None:
                self.bind(name, scope)
        elif isinstance(node, ast.stmt):
            self.statement(node, scope, bound)
        else:
            for child in ast.iter_child_nodes(node):
                self.expr(child, scope, bound)

    def read(self, name: str, scope: _Scope, bound: set[str]) -> None:
        if name == XP_NAME or not self._reads_global(name, scope, bound):
            return
        certain = bound if scope.kind == "module" else scope.module_bound
        if name not in certain:
            self.inputs.setdefault(name)

    def bind(
        self,
        name: str,
        scope: _Scope,
        *,
        delete: bool = False,
        walrus: bool = False,
        imported: bool = False,
    ) -> None:
        """Record ``name`` if this binding lands in the module namespace: as deleted, as bound
        by an import, or as an output (any other binding)."""
        if walrus:  # PEP 572: it binds in the scope that contains the comprehension
            while scope.kind == "local" and scope.parent is not None:
                scope = scope.parent
        if name == XP_NAME or scope.kind == "local":
            return
        if scope.kind == "module" or _declared_global(scope.table, name):
            kind = self.deleted if delete else self.imported if imported else self.outputs
            kind.setdefault(name)

    def _reads_global(
        self, name: str, scope: _Scope, bound: set[str], *, nested: bool = False
    ) -> bool:
        """Whether reading ``name`` in ``scope`` may look in the module namespace. ``nested``:
        the read is in a scope inside this one, which does not see a class's names."""
        if scope.kind == "module" or scope.parent is None:
            return True
        if scope.kind == "local":
            return name not in scope.names and self._reads_global(
                name, scope.parent, bound, nested=True
            )
        if scope.kind == "class" and nested:
            return self._reads_global(name, scope.parent, bound, nested=True)
        symbol = _lookup(scope.table, name)
        if scope.kind == "class":
            # A class body looks in its own namespace, then the module's; ``x = x`` there
            # reads the module's x. Only a name from an enclosing function bypasses that.
            return name not in bound and (symbol is None or not symbol.is_free())
        if symbol is None:  # not known to this function: resolved further out
            return self._reads_global(name, scope.parent, bound, nested=True)
        return symbol.is_global()

    def _function(
        self, node: ast.FunctionDef | ast.AsyncFunctionDef, scope: _Scope, bound: set[str]
    ) -> None:
        for decorator in node.decorator_list:
            self.expr(decorator, scope, bound)
        for default in _defaults(node.args):
            self.expr(default, scope, bound)
        outer = self._type_params(node, scope, bound)
        for arg in _parameters(node.args):
            if arg.annotation is not None:
                self.expr(arg.annotation, outer, bound)
        if node.returns is not None:
            self.expr(node.returns, outer, bound)
        self.bind(node.name, scope)  # bound now, while its body runs only when called
        inner = self._nested(scope, "function", bound, self._find(scope, node, node.name))
        self.block(node.body, inner, set())

    def _class(self, node: ast.ClassDef, scope: _Scope, bound: set[str]) -> None:
        for decorator in node.decorator_list:
            self.expr(decorator, scope, bound)
        outer = self._type_params(node, scope, bound)
        for base in (*node.bases, *node.keywords):
            self.expr(base, outer, bound)
        inner = self._nested(scope, "class", bound, self._find(scope, node, node.name))
        self.block(node.body, inner, set())

    def _type_params(
        self,
        node: ast.stmt,
        scope: _Scope,
        bound: set[str],
    ) -> _Scope:
        """The scope of Python 3.12's type parameters (``def f[T]``, ``class C[T]``,
        ``type X[T] = ...``), seen by annotations, bases and the alias; ``scope`` without any."""
        params = getattr(node, "type_params", ())
        if not params:
            return scope
        names = frozenset(param.name for param in params)
        return self._nested(scope, "local", bound, names=names)

    def _comprehension(
        self,
        node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp,
        scope: _Scope,
        bound: set[str],
    ) -> None:
        # The first iterable is evaluated outside, everything else inside the comprehension.
        self.expr(node.generators[0].iter, scope, bound)
        names = frozenset(
            name for generator in node.generators for name in _stored_names(generator.target)
        )
        inner = self._nested(scope, "local", bound, names=names)
        for index, generator in enumerate(node.generators):
            if index:
                self.expr(generator.iter, inner, bound)
            self.expr(generator.target, inner, bound)
            for condition in generator.ifs:
                self.expr(condition, inner, bound)
        if isinstance(node, ast.DictComp):
            self.expr(node.key, inner, bound)
            self.expr(node.value, inner, bound)
        else:
            self.expr(node.elt, inner, bound)

    def _nested(
        self,
        scope: _Scope,
        kind: str,
        bound: set[str],
        table: symtable.SymbolTable | None = None,
        names: frozenset[str] = frozenset(),
    ) -> _Scope:
        module_bound = bound if scope.kind == "module" else scope.module_bound
        return _Scope(kind, scope, table, names, module_bound)

    def _find(
        self,
        scope: _Scope,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda,
        name: str,
    ) -> symtable.SymbolTable | None:
        """The ``symtable`` table of a function, lambda or class: the first not yet matched
        with its name, line and parameters, searched through the tables this walk does not use
        (comprehensions, type parameters). None if not found; reads then resolve outwards."""
        while scope.table is None and scope.parent is not None:
            scope = scope.parent
        parameters = (
            frozenset()
            if isinstance(node, ast.ClassDef)
            else frozenset(arg.arg for arg in _parameters(node.args))
        )
        for table in _descendants(scope.table or self._table):
            if (
                table.get_id() not in self._matched
                and table.get_name() == name
                and table.get_lineno() == node.lineno
                and table.get_type() in ("function", "class")
                and (
                    not isinstance(table, symtable.Function)
                    or frozenset(table.get_parameters()) == parameters
                )
            ):
                self._matched.add(table.get_id())
                return table
        return None


def _descendants(table: symtable.SymbolTable) -> Iterator[symtable.SymbolTable]:
    """Child tables in source order, and inside the ones the walk does not use for scopes."""
    for child in table.get_children():
        yield child
        if child.get_type() not in ("function", "class") or child.get_name() in (
            _COMPREHENSIONS.values()
        ):
            yield from _descendants(child)


def _lookup(table: symtable.SymbolTable | None, name: str) -> symtable.Symbol | None:
    if table is None:
        return None
    try:
        return table.lookup(name)
    except KeyError:
        return None


def _declared_global(table: symtable.SymbolTable | None, name: str) -> bool:
    symbol = _lookup(table, name)
    return symbol is not None and symbol.is_declared_global()


def _defaults(args: ast.arguments) -> list[ast.expr]:
    return [*args.defaults, *(default for default in args.kw_defaults if default is not None)]


def _parameters(args: ast.arguments) -> list[ast.arg]:
    extra = [arg for arg in (args.vararg, args.kwarg) if arg is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


def _imported_name(stmt: ast.Import | ast.ImportFrom, alias: ast.alias) -> str:
    """``import a.b`` binds ``a``; any ``as`` name is bound as given."""
    if alias.asname is not None:
        return alias.asname
    return alias.name.partition(".")[0] if isinstance(stmt, ast.Import) else alias.name


def _target_names(target: ast.expr) -> list[str]:
    """Names an assignment target binds directly (through unpacking), not ``a.x`` or ``a[0]``."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _target_names(element)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def _stored_names(target: ast.expr) -> list[str]:
    return [
        node.id
        for node in ast.walk(target)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    ]


def _certainly_binds(stmt: ast.stmt) -> list[str]:
    """What a statement from ``_DEFINITE`` binds in its own namespace once it has run."""
    if isinstance(stmt, ast.Assign):
        return [name for target in stmt.targets for name in _target_names(target)]
    if isinstance(stmt, ast.AnnAssign):
        return _target_names(stmt.target) if stmt.value is not None else []
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return [_imported_name(stmt, alias) for alias in stmt.names]
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    return []


def run_on_slice(
    source: str,
    filename: str,
    inputs: CellInputs,
    outputs: tuple[str, ...],
    last_expression: bool,
    deleted: tuple[str, ...],
) -> CellOutcome:
    """What ``%%gpufunc`` ships (by reference: this module is importable on the executor):
    ``run_cell`` with the slice's array module, which the executor puts into the globals of
    the function it runs, as it does for every function (design.md: ``xp`` without import).

    The outputs and the shown value travel as ``Parts``, each pickled on its own: one that
    cannot leave the slice stays there as a handle, one the kernel cannot load is reported by
    the magic, and neither takes the other outputs with it."""
    from ..wire.payload import Parts

    outcome = run_cell(
        source,
        filename,
        inputs.values,
        outputs,
        last_expression,
        globals().get(XP_NAME),
        deleted=deleted,
    )
    return CellOutcome(Parts(outcome.outputs), Parts(outcome.shown), outcome.unbound)
