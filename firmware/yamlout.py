"""A tiny block-style YAML emitter for the cloud-init documents (no PyYAML on the build machine).

Handles what cloud-init documents need: mappings, lists, strings, integers,
booleans and ``None``. Strings are double-quoted with JSON escapes (a JSON
string is a valid YAML double-quoted scalar), except multi-line text, which is
written as a literal block (``|``) so a unit file or a script stays readable
on the card. Keys are plain when they are simple words, else quoted.
"""

from __future__ import annotations

import json
import re

__all__ = ["dump"]

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _scalar(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} to YAML")


def _key(k):
    k = str(k)
    return k if _PLAIN_KEY.match(k) and k.lower() not in ("yes", "no", "on", "off", "true",
                                                            "false", "null", "y", "n") else json.dumps(k)


def _block_ok(s):
    # A literal block keeps text verbatim only when every line is free of tabs
    # at its start and of trailing spaces (YAML would keep them, editors may not).
    return ("\n" in s and "\t" not in s and "\r" not in s
            and all(ln == ln.rstrip(" ") for ln in s.split("\n")) and not s.startswith(" "))


def _flat(v):
    """A non-empty list of scalars: written in flow style, ``["a", "b"]`` (JSON is valid YAML)."""
    return isinstance(v, list) and v and not any(isinstance(x, (dict, list)) for x in v)


def _flow(v):
    return "[" + ", ".join(_scalar(x) for x in v) + "]"


def _emit(v, indent, out):
    pad = " " * indent
    if isinstance(v, dict):
        if not v:
            out[-1] += " {}"
            return
        for k, x in v.items():
            out.append(f"{pad}{_key(k)}:")
            _value(x, indent, out)
    elif isinstance(v, list):
        if not v:
            out[-1] += " []"
            return
        for x in v:
            if isinstance(x, dict) and x:
                first = True
                for k, y in x.items():
                    out.append(f"{pad}{'- ' if first else '  '}{_key(k)}:")
                    _value(y, indent + 2, out)
                    first = False
            elif _flat(x):
                out.append(f"{pad}- {_flow(x)}")
            elif isinstance(x, list) and x:
                out.append(f"{pad}-")
                _emit(x, indent + 2, out)
            else:
                out.append(f"{pad}- {_scalar(x) if not isinstance(x, (dict, list)) else ('{}' if isinstance(x, dict) else '[]')}")
    else:
        raise TypeError("top level must be a mapping or a list")


def _value(x, indent, out):
    """Append the value of a key just written on the last line of ``out``."""
    if _flat(x):
        out[-1] += " " + _flow(x)
    elif isinstance(x, (dict, list)):
        if not x:
            out[-1] += " {}" if isinstance(x, dict) else " []"
        else:
            _emit(x, indent + 2, out)
    elif isinstance(x, str) and _block_ok(x):
        chomp = "" if x.endswith("\n") and not x.endswith("\n\n") else ("-" if not x.endswith("\n") else "+")
        out[-1] += f" |{chomp}"
        body = x[:-1] if x.endswith("\n") else x
        for ln in body.split("\n"):
            out.append((" " * (indent + 2) + ln) if ln else "")
    else:
        out[-1] += " " + _scalar(x)


def dump(doc, header=None):
    """YAML text of ``doc`` (a dict), with ``header`` as its first line (e.g. ``#cloud-config``)."""
    out = [header] if header else []
    out.append("")
    _emit(doc, 0, out)
    # The empty line after the header becomes the first key's line prefix; drop it.
    text = "\n".join(line for i, line in enumerate(out) if not (i == (1 if header else 0) and line == ""))
    return text + "\n"
