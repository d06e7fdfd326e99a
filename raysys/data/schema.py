"""What partners must agree on before one model can train on all of them.

A TableSchema carries no row content (names, dtypes, the set of class ids, a row count), so workers
can send it to the controller without breaking residency (ARCHITECTURE.md invariant 1); the
controller compares all partners' schemas with `check_schema_agreement` before training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class DataError(ValueError):
    """A partner's data is unusable. The message names the partner, the file and the column."""


@dataclass(frozen=True)
class TableSchema:
    """What partners must agree on, without any row content (safe to send to the controller)."""

    features: tuple[tuple[str, str], ...]  # (name, dtype as stored in the file, numpy spelling)
    label: tuple[str, str]  # (name, dtype)
    classes: tuple[int, ...]  # sorted distinct label values
    rows: int


def check_schema_agreement(
    schemas: dict[str, TableSchema], num_classes: int | None
) -> tuple[list[str], int]:
    """Check that all partners can feed one model; return (feature names, num_classes).

    The first partner (dict order, i.e. spec order) is the reference the others are compared with,
    so a message always names the odd partner out and the one it disagrees with.
    """
    if not schemas:
        raise DataError("no partner schemas to compare")
    if num_classes is not None and num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    ref_name, ref = next(iter(schemas.items()))
    ref_names = [n for n, _ in ref.features]
    ref_dtypes = dict(ref.features)

    for name, schema in schemas.items():
        names = [n for n, _ in schema.features]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:  # load_partner_table never produces this; a hand-built schema might
            raise DataError(f"partner {name!r} lists feature {twice!r} more than once")
        if names != ref_names:
            raise DataError(_feature_mismatch(name, names, ref_name, ref_names))
        for col, dtype in schema.features:
            if dtype != ref_dtypes[col]:
                raise DataError(
                    f"partner {name!r} column {col!r} has dtype {dtype} "
                    f"but partner {ref_name!r} has {ref_dtypes[col]}"
                )
        if schema.label[1] != ref.label[1]:
            raise DataError(
                f"partner {name!r} label column {schema.label[0]!r} has dtype {schema.label[1]} "
                f"but partner {ref_name!r} label column {ref.label[0]!r} has {ref.label[1]}"
            )

    if num_classes is None:
        num_classes = max(max(s.classes) for s in schemas.values()) + 1
    else:
        for name, schema in schemas.items():
            outside = [c for c in schema.classes if c >= num_classes]
            if outside:
                raise DataError(
                    f"partner {name!r} column {schema.label[0]!r}: labels {short_list(outside)} "
                    f"outside [0, {num_classes}) (num_classes={num_classes})"
                )
    return ref_names, num_classes


def _feature_mismatch(name: str, names: list[str], ref_name: str, ref_names: list[str]) -> str:
    missing = [n for n in ref_names if n not in names]
    extra = [n for n in names if n not in ref_names]
    head = f"partner {name!r} has features {short_list(names)}"
    other = f"partner {ref_name!r}"
    if missing:
        return f"{head} missing {missing[0]!r} that {other} has ({len(missing)} missing in all)"
    if extra:
        return f"{head} with extra {extra[0]!r} that {other} lacks ({len(extra)} extra in all)"
    i = next(i for i, (a, b) in enumerate(zip(names, ref_names, strict=True)) if a != b)
    return (
        f"partner {name!r} orders features differently from partner {ref_name!r}: "
        f"position {i} is column {names[i]!r} but partner {ref_name!r} has {ref_names[i]!r}"
    )


def short_list(items: Sequence, limit: int = 12) -> str:
    """A list for an error message, cut short so that 784 pixel columns do not flood the log."""
    items = list(items)
    if len(items) <= limit:
        return repr(items)
    head = ", ".join(repr(i) for i in items[:limit])
    return f"[{head}, ... ({len(items) - limit} more)]"
