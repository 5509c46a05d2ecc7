"""The ``math`` environment: a final answer in ``<answer>…</answer>`` or ``\\boxed{…}``
(or, with ``last_number_fallback``, the response's last number when it has neither).

An answer is correct when it is equivalent to the reference by, in order:

1. normalised string (LaTeX spacing, ``\\left``/``\\right``, ``\\dfrac``, degrees, a leading
   ``x =``, thousands separators, trailing unit words and ``\\text{…}`` units removed);
2. numeric value (integers, decimals, fractions ``a/b`` and ``\\frac{a}{b}``, percentages,
   compared exactly as rationals; ``50%`` matches both ``50`` and ``0.5``);
3. symbolic equality with sympy (``x+1`` vs ``1+x``, ``\\sqrt{8}`` vs ``2\\sqrt{2}``), on a
   whitelisted expression grammar (model output is never evaluated as arbitrary Python) and
   under a time limit;
4. math-verify, when the ``math-verify`` package is installed.

Tuples compare element by element, in order.
"""

from __future__ import annotations

import functools
import math
import re
import signal
import threading
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

from drift_engine.envs.base import (
    DEFAULT_FEEDBACK,
    Message,
    Problem,
    PromptTemplateEnv,
    StepResult,
    check_option_types,
)
from drift_engine.errors import EnvironmentSpecError

DEFAULT_MATH_PROMPT = (
    "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)

# ---------------------------------------------------------------------------- extraction

_TAGS = {
    flags: (re.compile(r"<answer>", flags), re.compile(r"</answer>", flags))
    for flags in (re.IGNORECASE, 0)
}
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_BARE_ARGUMENT = re.compile(r"[^\s$]+")
_BRACE = re.compile(r"[{}]")


def last_answer_tag(text: str, ignore_case: bool = True) -> tuple[int, str] | None:
    """(start, content) of the last ``<answer>…</answer>``: the last match of the lazy
    ``<answer>(.*?)</answer>`` (DOTALL), found in one left-to-right pass (the regex is
    quadratic on many unclosed tags)."""
    open_tag, close_tag = _TAGS[re.IGNORECASE if ignore_case else 0]
    last, pos = None, 0
    while (opened := open_tag.search(text, pos)) is not None:
        closed = close_tag.search(text, opened.end())
        if closed is None:
            break
        last, pos = (opened.start(), opened.end(), closed.start()), closed.end()
    return None if last is None else (last[0], text[last[1] : last[2]])


def _closing_braces(text: str) -> dict[int, int]:
    """{index of a "{": index after its matching "}"} for every balanced group (one pass)."""
    stack, close = [], {}
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            close[stack.pop()] = match.end()
    return close


def _braced(text: str, open_index: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[open_index] == "{"`` and the index after it."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i], i + 1
    return None


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last complete ``\\boxed{…}`` (nested braces) or ``\\boxed x``.

    Linear in ``len(text)``: brace groups are matched in one pass, and the candidates are
    tried from the last one back, so only the winner's bare argument is scanned."""
    close = None
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            if close is None:
                close = _closing_braces(text)
            after = close.get(end)
            if after is not None:
                return match.start(), text[end + 1 : after - 1]
        else:  # "\boxed 5": the argument runs to the next whitespace or "$"
            bare = _BARE_ARGUMENT.match(text, end)
            if bare:
                return match.start(), bare.group(0)
    return None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a response: the last ``<answer>…</answer>`` or ``\\boxed{…}``,
    whichever comes later; a ``\\boxed`` inside the answer tag is unwrapped. None if absent."""
    candidates: list[tuple[int, str]] = []
    tag = last_answer_tag(text)
    if tag is not None:
        boxed = _last_boxed(tag[1])
        candidates.append((tag[0], boxed[1] if boxed else tag[1]))
    boxed = _last_boxed(text)
    if boxed is not None:
        candidates.append(boxed)
    if not candidates:
        return None
    answer = max(candidates, key=lambda c: c[0])[1].strip()
    return answer or None


# A number as written in prose: "-3", "1,250", "2.5" (a sentence's full stop is not a decimal).
_PROSE_NUMBER = re.compile(
    r"(?<![\w.])[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|(?<![\w.])[-+]?\d+(?:\.\d+)?"
)


def last_number(text: str) -> str | None:
    """The last number written in ``text`` ("... so she has 1,250 apples." -> "1250"), or
    None: the "flexible extract" of GSM8K evaluations, for models that do not mark their
    final answer."""
    numbers = _PROSE_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# ------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "square units|units|unit|degrees|degree|dollars|dollar|cents|cent|percent|"
    "cm|mm|km|m|meters|meter|metres|metre|inches|inch|in|feet|foot|ft|yards|yard|miles|mile|"
    "seconds|second|sec|s|minutes|minute|min|hours|hour|hr|days|day|weeks|week|years|year|"
    "kg|g|grams|gram|pounds|pound|lbs|lb|liters|liter|litres|litre|l|ml|mph|km/h"
)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_TRAILING_UNIT = re.compile(
    rf"^({_NUMBER}|{_NUMBER}/\d+|\\frac\{{[^{{}}]*\}}\{{[^{{}}]*\}})\s*(?:{_UNIT_WORDS})(?:\^?[23])?$"
)
_TEXT_BLOCK = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\s*=\s*(?=[^=])")


def normalize_math_answer(answer: str) -> str:
    """A canonical string form of an answer (see the module docstring)."""
    s = answer.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\[\[(]|\\[\])]$", "", s).strip()
    for token in (
        "\\displaystyle",
        "\\left",
        "\\right",
        "\\!",
        "\\,",
        "\\;",
        "\\:",
        "\\quad",
        "\\qquad",
    ):
        s = s.replace(token, " " if token.startswith("\\q") else "")
    s = s.replace("\\ ", " ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\%", "%").replace("\\$", "").replace("$", "")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    # Unit and word blocks: "\text{ cm}" after a number goes, "\text{yes}" alone keeps its text.
    s = _TEXT_BLOCK.sub(lambda m: " " + m.group(1).strip() + " ", s).strip()
    s = _ASSIGNMENT.sub("", s, count=1)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    unit = _TRAILING_UNIT.match(s)
    if unit:
        s = unit.group(1)
    s = s.replace(" ", "")
    if re.fullmatch(r"[A-Za-z]+", s):
        s = s.lower()
    # "0.50" and "+3" as plain numbers
    if re.fullmatch(r"[-+]?\d+\.\d*0+", s):
        s = s.rstrip("0").rstrip(".")
    if s.startswith("+") and re.fullmatch(r"\+\d+(?:\.\d+)?", s):
        s = s[1:]
    return s


# ------------------------------------------------------------------------------ numbers

_FRAC = re.compile(r"^([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT = re.compile(r"^([-+]?)\\frac(\d)(\d)$")


def _rational(s: str) -> Fraction | None:
    """The exact value of a number, fraction or ``\\frac``; None when ``s`` is not one, or
    has more digits than Python converts to an int (4300)."""
    try:
        return _parse_rational(s)
    except ValueError:
        return None


def _parse_rational(s: str) -> Fraction | None:
    if re.fullmatch(_NUMBER, s) or re.fullmatch(rf"{_NUMBER}[eE][-+]?\d{{1,3}}", s):
        return Fraction(s)
    m = re.fullmatch(rf"({_NUMBER})/({_NUMBER})", s)
    if m is None:
        m2 = _FRAC.match(s) or _FRAC_SHORT.match(s)
        if m2 is None:
            return None
        sign, num, den = m2.groups()
        num_v, den_v = _rational(num), _rational(den)
        if num_v is None or den_v is None or den_v == 0:
            return None
        return -num_v / den_v if sign == "-" else num_v / den_v
    num_v, den_v = Fraction(m.group(1)), Fraction(m.group(2))
    return None if den_v == 0 else num_v / den_v


def _numeric_values(s: str) -> set[Fraction]:
    """The values a normalised answer may mean: a percentage means both x and x/100."""
    if s.endswith("%"):
        value = _rational(s[:-1])
        return set() if value is None else {value, value / 100}
    value = _rational(s)
    return set() if value is None else {value}


# ------------------------------------------------------------------------------ symbolic

_ALLOWED_NAMES = {"sqrt", "pi", "oo", "sin", "cos", "tan", "log", "exp", "E", "I"}
_LATEX_WORDS = {
    "\\pi": " pi ",
    "\\infty": " oo ",
    "\\cdot": "*",
    "\\times": "*",
    "\\div": "/",
    "\\sin": " sin",
    "\\cos": " cos",
    "\\tan": " tan",
    "\\ln": " log",
    "\\log": " log",
    "\\exp": " exp",
}


def _latex_to_expr(s: str) -> str | None:
    """A sympy-parsable expression for a small LaTeX subset, or None outside that subset."""
    out = []
    i = 0
    while i < len(s):
        if s.startswith("\\frac", i) or s.startswith("\\sqrt", i):
            is_frac = s.startswith("\\frac", i)
            i += 5
            root = None
            if not is_frac and i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close < 0:
                    return None
                root, i = _latex_to_expr(s[i + 1 : close]), close + 1
            args = []
            for _ in range(2 if is_frac else 1):
                if i < len(s) and s[i] == "{":
                    group = _braced(s, i)
                    if group is None:
                        return None
                    inner, i = group
                elif i < len(s):  # "\frac12", "\sqrt2"
                    inner, i = s[i], i + 1
                else:
                    return None
                converted = _latex_to_expr(inner)
                if converted is None:
                    return None
                args.append(converted)
            if is_frac:
                out.append(f"(({args[0]})/({args[1]}))")
            elif root is not None:
                out.append(f"(({args[0]})**(1/({root})))")
            else:
                out.append(f"sqrt({args[0]})")
            continue
        if s[i] == "\\":
            word = re.match(r"\\[A-Za-z]+", s[i:])
            if word is None or word.group(0) not in _LATEX_WORDS:
                return None
            out.append(_LATEX_WORDS[word.group(0)])
            i += len(word.group(0))
            continue
        out.append(s[i])
        i += 1
    expr = "".join(out).replace("{", "(").replace("}", ")").replace("^", "**")
    if not re.fullmatch(r"[0-9A-Za-z+\-*/().\s]*", expr) or "__" in expr:
        return None
    # Single-letter variables and known functions only: "yes" must not become y*e*s.
    if any(len(n) > 1 and n not in _ALLOWED_NAMES for n in re.findall(r"[A-Za-z]+", expr)):
        return None
    # Power towers and huge exponents are evaluated eagerly by sympy in C (no interrupt).
    if re.search(r"\*\*[^*]*\*\*", expr) or any(
        len(e) > 3 for e in re.findall(r"\*\*\s*\(?\s*(\d+)", expr)
    ):
        return None
    return expr


class _Timeout(Exception):
    pass


_limit_active = False  # a _time_limit is running (main thread only: signals)


def _limit_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit in the main thread; elsewhere no limit (callers keep inputs small).
    Inside another limit it adds none: the outer one governs."""
    global _limit_active
    if not _limit_usable() or _limit_active:
        yield
        return

    def _raise(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _limit_active = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _limit_active = False


@functools.cache
def _sympy() -> tuple[Any, Any, tuple]:
    """(sympy, parse_expr, transformations), imported once; callers import it before a time
    limit starts (an import cut short by the limit would leave sympy half-loaded)."""
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    return sympy, parse_expr, standard_transformations + (implicit_multiplication_application,)


def _symbolic_equal(a: str, b: str, timeout: float) -> bool:
    if len(a) > 200 or len(b) > 200:
        return False
    expr_a, expr_b = _latex_to_expr(a), _latex_to_expr(b)
    if expr_a is None or expr_b is None:
        return False
    sympy, parse_expr, transformations = _sympy()
    nested = _limit_active  # an enclosing limit (a whole MathEnv.step) must see its timeout
    try:
        with _time_limit(timeout):
            lhs = parse_expr(expr_a, transformations=transformations)
            rhs = parse_expr(expr_b, transformations=transformations)
            return bool(sympy.simplify(lhs - rhs) == 0)
    except _Timeout:
        if nested:
            raise
        return False
    except Exception:
        return False


def _math_verify_equal(reference: str, answer: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${reference}$"), parse(f"${answer}$")))
    except _Timeout:  # the enclosing MathEnv.step limit
        raise
    except Exception:  # math-verify's own timeouts and parse failures: not equivalent
        return False


def _split_tuple(s: str) -> list[str] | None:
    """Top-level comma-separated parts of "(a,b)" / "a,b"; None if there is one part."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        s = s[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts if len(parts) > 1 else None


def _brackets(s: str) -> str:
    """The outer bracket pair of a tuple or interval ("()" also for a bare "a,b")."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        return s[0] + s[-1]
    return "()"


def math_equal(
    reference: str, answer: str, *, use_math_verify: bool = True, timeout: float = 2.0
) -> bool:
    """Whether ``answer`` is equivalent to ``reference`` (both raw answer strings)."""
    ref, ans = normalize_math_answer(reference), normalize_math_answer(answer)
    if not ref or not ans:
        return False
    if ref == ans:
        return True
    ref_values, ans_values = _numeric_values(ref), _numeric_values(ans)
    if ref_values and ans_values:
        return bool(ref_values & ans_values)
    ref_parts, ans_parts = _split_tuple(ref), _split_tuple(ans)
    if ref_parts is not None or ans_parts is not None:
        if ref_parts is None or ans_parts is None or len(ref_parts) != len(ans_parts):
            return use_math_verify and _math_verify_equal(reference, answer)
        if _brackets(ref) != _brackets(ans):  # "[1,2)" is not "(1,2)"
            return False
        return all(
            math_equal(r, a, use_math_verify=use_math_verify, timeout=timeout)
            for r, a in zip(ref_parts, ans_parts, strict=True)
        )
    if _symbolic_equal(ref, ans, timeout):
        return True
    return use_math_verify and _math_verify_equal(reference, answer)


def math_verify_available() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- environment


class MathEnv(PromptTemplateEnv):
    """Free-form math answers checked against ``problem["answer"]``.

    Problem fields: ``question`` (str), ``answer`` (str or number; a ``\\boxed{}`` in it is
    unwrapped, so a full reference solution works too). With ``last_number_fallback`` a
    response with neither ``<answer>`` nor ``\\boxed`` is scored by its last number
    (:func:`last_number`): small models that answer in prose are then scored on their
    arithmetic, not on the format.
    """

    name = "math"
    required_fields = ("question", "answer")

    def __init__(
        self,
        *,
        prompt_template: str = DEFAULT_MATH_PROMPT,
        system_prompt: str | None = None,
        feedback: str = DEFAULT_FEEDBACK,
        use_math_verify: bool | None = None,
        sympy_timeout: float = 2.0,
        last_number_fallback: bool = False,
    ) -> None:
        super().__init__(
            prompt_template=prompt_template, system_prompt=system_prompt, feedback=feedback
        )
        check_option_types(
            "math",
            use_math_verify=(use_math_verify, (bool, type(None))),
            last_number_fallback=(last_number_fallback, bool),
        )
        if (
            isinstance(sympy_timeout, bool)
            or not isinstance(sympy_timeout, (int, float))
            or not math.isfinite(sympy_timeout)
            or sympy_timeout <= 0
        ):
            raise EnvironmentSpecError(
                f"the math environment's sympy_timeout must be a positive number of seconds "
                f"(the time allowed to check one answer), got {sympy_timeout!r}"
            )
        if use_math_verify and not math_verify_available():
            raise EnvironmentSpecError(
                "use_math_verify=True but the math-verify package is not installed: "
                "pip install 'drift-engine[math]' or leave use_math_verify unset."
            )
        self.use_math_verify = (
            math_verify_available() if use_math_verify is None else bool(use_math_verify)
        )
        self.sympy_timeout = float(sympy_timeout)
        self.last_number_fallback = last_number_fallback

    def initial_messages(self, problem: Problem) -> list[Message]:
        return self.prompt_messages(self.prompt_template.format(question=problem["question"]))

    def reference_answer(self, problem: Problem) -> str:
        reference = str(problem["answer"])
        boxed = _last_boxed(reference)
        return boxed[1] if boxed is not None else reference

    def step(self, problem: Problem, answer: str, turn: int) -> StepResult:
        """Check ``answer``; the whole check (extraction, normalisation, the comparisons) runs
        under ``sympy_timeout`` seconds in the main thread, and raises TimeoutError beyond it
        (``score_answer`` turns that into reward 0)."""
        _sympy()  # imported outside the limit
        try:
            with _time_limit(self.sympy_timeout):
                return self._step(problem, answer)
        except _Timeout:
            raise TimeoutError(
                f"checking the answer took longer than sympy_timeout={self.sympy_timeout} s"
            ) from None

    def _step(self, problem: Problem, answer: str) -> StepResult:
        parsed = extract_math_answer(answer)
        if parsed is None and self.last_number_fallback:
            parsed = last_number(answer)
        if parsed is None or not normalize_math_answer(parsed):
            return StepResult(0.0, False, self.feedback, None, False)
        correct = math_equal(
            self.reference_answer(problem),
            parsed,
            use_math_verify=self.use_math_verify,
            timeout=self.sympy_timeout,
        )
        return StepResult(
            reward=1.0 if correct else 0.0,
            done=correct,
            feedback=None if correct else self.feedback,
            answer=normalize_math_answer(parsed),
            correct=correct,
        )

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "use_math_verify": self.use_math_verify,
            "sympy_timeout": self.sympy_timeout,
            "last_number_fallback": self.last_number_fallback,
        }
