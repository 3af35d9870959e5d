"""Parses preprocessing strings such as ``decode|resize(224)|value_range(-1, 1)``.

The string is read as a Python expression whose ``|``-joined terms are op names, optionally
called with literal arguments. Only literals are accepted (via ``ast.literal_eval`` on each
argument node), so a config string can never execute code.
"""

import ast
import dataclasses
from typing import Any


class PPError(ValueError):
    """A preprocessing string or one of its ops is invalid."""


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One parsed op: its name and literal positional and keyword arguments."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _literal(node: ast.AST, spec: str, op: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError) as e:
        text = ast.get_source_segment(spec, node) or ast.dump(node)
        raise PPError(
            f"op '{op}': argument {text!r} is not a literal (numbers, strings, tuples, lists, "
            f"True/False/None) in pp string {spec!r}"
        ) from e


def _walk(node: ast.AST, spec: str, out: list[OpCall]) -> None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        _walk(node.left, spec, out)
        _walk(node.right, spec, out)
    elif isinstance(node, ast.Name):
        out.append(OpCall(node.id))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise PPError(f"op '{name}': *args are not allowed in pp string {spec!r}")
            args.append(_literal(a, spec, name))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise PPError(f"op '{name}': **kwargs are not allowed in pp string {spec!r}")
            kwargs[kw.arg] = _literal(kw.value, spec, name)
        out.append(OpCall(name, tuple(args), kwargs))
    else:
        text = ast.get_source_segment(spec, node) or ast.dump(node)
        raise PPError(
            f"cannot read {text!r} in pp string {spec!r}: expected op or op(args) joined by '|'"
        )


def parse_pp(spec: str) -> list[OpCall]:
    """Returns the ops of a pp string in order; an empty string gives no ops."""
    spec = " ".join(spec.split())  # Configs may wrap long strings over several lines.
    if not spec:
        return []
    try:
        tree = ast.parse(spec, mode="eval")
    except SyntaxError as e:
        raise PPError(f"cannot parse pp string {spec!r}: {e.msg}") from e
    out: list[OpCall] = []
    _walk(tree.body, spec, out)
    return out
