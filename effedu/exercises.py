"""Exercises that check themselves: the helpers a notebook's *check cells* call.

Every exercise of the course has three cells:

1. the task, in markdown;
2. a **solution cell** (tagged ``solution``) whose answer sits between two marker lines::

       ### BEGIN SOLUTION
       k_star = (L * a / c) ** 0.5
       ### END SOLUTION

   ``make student`` (:mod:`effedu.student`) replaces what lies between the markers with a stub — ``k_star = ...``
   for a name the answer defines, ``raise NotImplementedError`` inside a function body — and keeps every other
   line, so the learner sees the signature, the set-up and the print that follow;
3. a **check cell** (not tagged) that grades the answer against a closed form, an oracle or a property::

       exercises.answered(k_star=k_star)            # still `...`? say so instead of a confusing TypeError
       exercises.check(abs(k_star - 33.9) < 1, f"expected k* ≈ 34 for L = 64; got {k_star:.1f}: did you use a/c?")
       exercises.passed(1)

In the course notebooks every check passes (nbval runs them); in the student copy every check fails until the
learner's answer is right (``tests/exercises`` proves it, notebook by notebook).
"""
from __future__ import annotations

__all__ = ["ExerciseNotDone", "answered", "check", "check_close", "passed"]


class ExerciseNotDone(AssertionError):
    """An answer is still the stub's ``...`` (or ``None``)."""


def answered(**answers):
    """Raise :class:`ExerciseNotDone` naming each answer that is still ``...`` or ``None``."""
    missing = [name for name, value in answers.items() if value is Ellipsis or value is None]
    if missing:
        names = ", ".join(f"`{n}`" for n in missing)
        raise ExerciseNotDone(
            f"{names} {'is' if len(missing) == 1 else 'are'} not answered yet: replace the `...` in the solution "
            f"cell above with your code, run it, then run this check again."
        )
    return True


def check(condition, hint):
    """Raise ``AssertionError(hint)`` unless ``condition`` is true. ``hint`` should say what was expected, what
    was found and which mistake usually leads there."""
    if not isinstance(hint, str) or not hint:
        raise TypeError(f"check: hint must be a non-empty str saying what was expected, got {hint!r}")
    if not bool(condition):
        raise AssertionError(hint)
    return True


def check_close(value, expected, *, rtol=0.05, atol=0.0, name="your answer", hint=""):
    """Check ``|value − expected| ≤ atol + rtol·|expected|`` with a message that shows both numbers."""
    answered(**{name.replace(" ", "_"): value})
    try:
        v, e = float(value), float(expected)
    except (TypeError, ValueError):
        raise AssertionError(f"{name} must be a number, got {type(value).__name__} ({value!r})") from None
    ok = abs(v - e) <= atol + rtol * abs(e)
    msg = f"{name} = {v:.4g}, expected {e:.4g} (within {rtol:.0%}" + (f" + {atol:g}" if atol else "") + ")"
    return check(ok, msg + (f": {hint}" if hint else ""))


def passed(number, what=""):
    """Print the line a passing check cell ends with (stable text, compared by nbval)."""
    print(f"✔ Exercise {number} passed" + (f": {what}" if what else ""))
