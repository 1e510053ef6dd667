"""Text templates of the evaluation commands: files a user can replace.

The bundled templates live in ``fastebm/eval/templates/`` (fastebm's own wording). Every command
that renders one takes ``--templates DIR``: a file of the same name in DIR replaces the bundled one
(e.g. the paper's judge prompt, rewritten to the reply contract of docs/evaluation.md).

Placeholders are ``{name}`` with ``name`` an identifier; any other brace is literal text, so a
template may show a JSON example (``{"VEG": "A"}``) as it is. An unknown placeholder is an error
naming the file and the placeholder, never a silently empty string.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

from fastebm.config import ConfigError

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ConfigError):
    """A template that cannot be rendered: the message names the file and the placeholder."""


def template_path(name: str, template_dir: str = "") -> str:
    """The file of template ``name``: ``template_dir/name`` when it exists, else the bundled one."""
    if template_dir:
        path = os.path.join(os.path.expanduser(template_dir), name)
        if os.path.isfile(path):
            return path
    path = os.path.join(BUNDLED_DIR, name)
    if not os.path.isfile(path):
        raise TemplateError(f"template {name!r}: not in {template_dir or '(no --templates dir)'} nor among the "
                            f"bundled templates ({BUNDLED_DIR})")
    return path


def load_template(name: str, template_dir: str = "") -> tuple[str, str]:
    """``(text, path)`` of template ``name`` (a final newline dropped)."""
    path = template_path(name, template_dir)
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n"), path


def render(text: str, values: Mapping[str, object], source: str) -> str:
    """``text`` with every ``{name}`` replaced by ``values[name]``; ``source`` names the file in errors."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise TemplateError(f"{source}: unknown placeholder {{{key}}}; this template may use: "
                                + ", ".join("{" + k + "}" for k in sorted(values)))
        return str(values[key])
    return _PLACEHOLDER.sub(sub, text)


def render_template(name: str, values: Mapping[str, object], template_dir: str = "") -> str:
    """Load template ``name`` (``template_dir`` first) and render it."""
    text, path = load_template(name, template_dir)
    return render(text, values, path)
