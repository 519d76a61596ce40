"""The program in a model's response to a code problem, by fixed rules (`extract_code`, `complete_function`).

Rules of `extract_code(response, entry_point)`:

1. Fences. A fence is a line that starts (after at most 3 spaces) with three or more backticks or tildes, followed
   by an optional language tag; a block runs to the next fence line of the same character and at least the same
   length. A block whose closing fence never comes (a response cut at max_new_tokens) runs to the end of the
   response.
2. Candidates. Non-empty blocks tagged python, py, python3 or not tagged at all are candidates; blocks tagged with
   another language (text, bash, output, json, ...) never are.
3. Choice. Among the candidates, those that define `entry_point` (a `def entry_point(` line, any indentation) are
   preferred when an entry point is given; then tagged python blocks over untagged ones; the LAST block of the
   preferred kind is taken (models show a draft and then the fix, or the solution and then a usage example that
   the entry-point rule skips).
4. No candidate block (no fence at all, or only other languages): the whole response is the program, as a raw
   completion; a line holding only a fence is dropped from it.

`complete_function(prompt, code, entry_point)` then makes a HumanEval-style program: if `code` defines the entry
point at top level, the program is the prompt (its imports, helpers and the documented stub) followed by `code`,
whose definition replaces the stub; otherwise `code` is the body that continues the prompt. A body written without
its leading indentation (the first code line at column 0) is indented by four spaces; if the result does not
compile, the other reading is tried and the first that compiles is kept.
"""
from __future__ import annotations

import re
import textwrap

PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[^\s`]*)[^`]*$")


def fenced_blocks(response: str) -> list[tuple[str, str]]:
    """(tag, code) for each fenced block in order; tag lower-cased, '' when absent."""
    blocks, lines, i = [], response.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, tag = m.group("fence"), m.group("tag").lower()
        body, j = [], i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("tag"):
                break
            body.append(lines[j])
            j += 1
        blocks.append((tag, "\n".join(body)))
        i = j + 1
    return blocks


def defines(code: str, name: str, top_level: bool = False) -> bool:
    """Whether `code` has a `def name(` line (at column 0 when `top_level`)."""
    indent = "" if top_level else r"[ \t]*"
    return re.search(rf"^{indent}(async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The program in `response` (rules in the module docstring)."""
    candidates = [(tag, code) for tag, code in fenced_blocks(response)
                  if (tag in PYTHON_TAGS or tag == "") and code.strip()]
    if not candidates:
        return "\n".join(line for line in response.splitlines() if not _FENCE.match(line))
    if entry_point:
        defining = [c for c in candidates if defines(c[1], entry_point)]
        candidates = defining or candidates
    tagged = [c for c in candidates if c[0] in PYTHON_TAGS]
    return (tagged or candidates)[-1][1]


def _compiles(source: str) -> bool:
    try:
        compile(source, "<candidate>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def complete_function(prompt: str, code: str, entry_point: str) -> str:
    """A whole program from a HumanEval-style `prompt` and the extracted `code` (rules in the module docstring)."""
    if defines(textwrap.dedent(code), entry_point, top_level=True):
        return f"{prompt.rstrip()}\n\n{textwrap.dedent(code).strip(chr(10))}\n"
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    body = code.strip("\n")
    first = next((line for line in body.splitlines() if line.strip()), "")
    as_is = head + body + "\n"
    indented = head + textwrap.indent(textwrap.dedent(body), "    ") + "\n"
    readings = [indented, as_is] if first and not first[0].isspace() else [as_is, indented]
    return next((r for r in readings if _compiles(r)), readings[0])
