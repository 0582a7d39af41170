"""Refuse a run that cannot fit in this machine's memory, before anything is allocated.

The estimate adds up what a run holds for its whole life, for every seed:

- the task's parameters and constants: its YAML's ``footprint:``, e.g. the bowl's
  ``parameters: dim`` and ``constants: dim * dim`` (its Hessian);
- the optimizer's state: its YAML's ``footprint: {state: …}``, in numbers per seed, an
  expression in ``n`` (the task's parameter count) and the optimizer's hyperparameters,
  e.g. LODO's blocks and their Adam moments;
- the loss trace (one number per step) and, when recorded, the trajectory (n per step);

at the task's ``bytes_per_number`` (8: the small tasks run in float64), for the ``seeds_in_memory``
held at once (all of them on the small tasks; 1 on the image tasks, which train one seed after
another). XLA's temporaries and a model's activations come on top, so the estimate is a lower
bound: a refused run needs at least that much.

A footprint expression is arithmetic (``+ - * / // **``, ``ceil``, ``min``, ``max``) over those
names; it is evaluated here by walking its syntax tree, which allows nothing else, rather than
by ``eval``.
"""

from __future__ import annotations

import ast
import math
import operator
import os
from pathlib import Path

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.USub: operator.neg}
_FUNCTIONS = {"ceil": math.ceil, "min": min, "max": max}
GIB = 2**30


class FootprintError(ValueError):
    """A ``footprint:`` expression that cannot be evaluated (a mistake in a YAML)."""


def evaluate(expression, names: dict) -> float:
    """The value of a footprint expression (a number, or arithmetic over ``names``)."""
    if isinstance(expression, (int, float)) and not isinstance(expression, bool):
        return float(expression)
    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError:
        raise FootprintError(f"cannot read the footprint {expression!r}") from None

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise FootprintError(f"the footprint {expression!r} names {node.id!r}, which is not a setting")
            found = names[node.id]
            return max(found) if isinstance(found, (list, tuple)) else found  # per-seed values: the largest
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and not node.keywords:
            return _FUNCTIONS[node.func.id](*[value(a) for a in node.args])
        raise FootprintError(f"the footprint {expression!r} may only use numbers, settings, + - * / // **, "
                             f"ceil, min and max")

    try:
        return float(value(tree))
    except (TypeError, ZeroDivisionError, OverflowError) as err:
        raise FootprintError(f"the footprint {expression!r} cannot be evaluated ({err})") from None


def machine_bytes() -> int:
    """The memory this process may use: the machine's, or its control group's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def estimate(*, task_footprint: dict, optimizer_footprint: dict, task_options: dict, hyperparameters: dict,
             num_seeds: int, steps: int, record_trajectory: bool) -> dict[str, float]:
    """Bytes the run holds, by part (``parameters``, ``task constants``, ``optimizer state``, ``loss trace``, …)."""
    names = {k: v for k, v in {**task_options, "num_seeds": num_seeds, "steps": steps}.items()
             if isinstance(v, (int, float, list)) and not isinstance(v, bool)}
    n = evaluate(task_footprint.get("parameters", 0), names)
    size = float(task_footprint.get("bytes_per_number", 8))
    at_once = min(num_seeds, evaluate(task_footprint.get("seeds_in_memory", num_seeds), names))
    optimizer_names = {**{k: v for k, v in hyperparameters.items()
                          if isinstance(v, (int, float, list)) and not isinstance(v, bool)}, "n": n}
    parts = {
        "parameters": at_once * n * size,
        "task constants": at_once * evaluate(task_footprint.get("constants", 0), names) * size,
        "optimizer state": at_once * evaluate(optimizer_footprint.get("state", 0), optimizer_names) * size,
        "loss trace": num_seeds * steps * 8.0,
    }
    if record_trajectory:
        parts["trajectory"] = num_seeds * steps * n * 8.0
    return parts


def describe(parts: dict[str, float]) -> str:
    """The largest parts in words, e.g. "optimizer state 7,450 GiB, task constants 0.1 GiB"."""
    biggest = sorted(((v, k) for k, v in parts.items() if v > 0), reverse=True)[:2]
    return ", ".join(f"{k} {gib(v)}" for v, k in biggest)


def gib(value: float) -> str:
    gib = value / GIB
    return f"{gib:,.0f} GiB" if gib >= 100 else f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib:.2g} GiB"
