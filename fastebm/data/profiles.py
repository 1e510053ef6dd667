"""Character profiles: free text or structured fields, for both speakers of a record, and the importer
of a profile database in the released run's structure.

A profiles file (``data.profiles``) is JSON in one of two forms:

    simple       {data_source: {character name: profile}}
    structured   {"fastebm_profiles": 1,
                  "movies":  {data_source: {character name: profile}},
                  "global":  {character name: profile},          # any data_source (e.g. a fan persona)
                  "aliases": {another spelling: data_source}}    # e.g. "LOTR" -> "The Lord of the Ring"

A profile is a string (free text, used as it is) or an object of fields, each a string or a list of
strings. ``Profiles.find(data_source, name)`` looks in the record's movie (its ``data_source`` after
``aliases``; failing an exact key, a key equal up to case, spaces and punctuation), then in
``global``; a character found in neither is counted in ``missing`` (the ``profiles_missing`` metric)
and the prompt gets ``prompt.missing_profile``.

A structured profile is rendered one field per line (``render_profile``) in a stable order: the
fields of ``FIELD_ORDER`` first, in that order, then any other field in the order of the file.
Each line is ``prompt.profile_field`` (default ``- {label}: {value}``): ``label`` is the field
name with ``_`` as a space, title-cased (``speech_style`` -> ``Speech Style``), ``value`` the text,
a list's items joined by ``prompt.list_separator``. Empty values and items are left out.

``fastebm data profiles import SRC OUT.json`` converts a Python profile database laid out as the
release's (``GLOBAL_USER_PROFILES``: name -> fields; ``MOVIE_PROFILE_DB``: movie -> ``main`` / ``sub``
/ ``atmosphere`` -> name -> fields; ``MOVIE_ALIASES``: spelling -> movie) into the structured form.
The file is parsed with ``ast`` and only literals are read (``ast.literal_eval``): it is never
executed or imported. The released lookup order is kept: a movie's ``main`` characters, then the
global profiles, then its ``sub`` characters (a ``sub`` name that a global profile shadows is left
out and reported); ``atmosphere`` entries are not read by the released lookup and are imported only
when asked (``include_atmosphere``).
"""
from __future__ import annotations

import ast
import copy
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from fastebm.data import DataError

Profile = Union[str, dict]

FIELD_ORDER = ("personality", "catchphrases", "speech_style", "relationships", "strengths", "weaknesses",
               "background", "motivation")
"""The order structured profile fields are rendered in (then any other field, in the file's order)."""

FORMAT_KEY = "fastebm_profiles"
FORMAT_VERSION = 1


def _fold(text: str) -> str:
    """A name compared up to case, spaces and punctuation ("Harry_potter" ~ "Harry Potter")."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _check_profile(value, path: str, key: str) -> Profile:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise DataError(f"{path}: field '{key}': expected a string or an object of fields, got {value!r}")
    for k, v in value.items():
        if isinstance(v, str):
            continue
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise DataError(f"{path}: field '{key}.{k}': expected a string or a list of strings, got {v!r}")
    return value


def _check_table(table, path: str, key: str) -> dict:
    if not isinstance(table, dict):
        raise DataError(f"{path}: field '{key}': expected an object of character name -> profile, got {table!r}")
    return {name: _check_profile(p, path, f"{key}.{name}") for name, p in table.items()}


class Profiles:
    """The profiles of ``data.profiles``, looked up per record speaker; misses are counted in ``missing``."""

    NEUTRAL = "No profile is available for this character; stay true to how they speak in the dialogue."

    def __init__(self, table: Optional[dict] = None, source: str = "", *, global_profiles: Optional[dict] = None,
                 aliases: Optional[dict] = None):
        self.table = table or {}                   # data_source -> name -> profile
        self.global_profiles = global_profiles or {}
        self.aliases = aliases or {}
        self.source = source
        self.missing: dict[str, int] = {}
        self._folded = {_fold(k): k for k in self.table}

    @classmethod
    def load(cls, path: str) -> "Profiles":
        """Read a profiles file (either form); errors name the file and the field."""
        if not path:
            return cls()
        if not os.path.isfile(path):
            raise DataError(f"{path}: profiles file not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected an object {{data_source: {{name: profile}}}}")
        if FORMAT_KEY not in data:
            return cls({src: _check_table(chars, path, src) for src, chars in data.items()}, path)
        if data[FORMAT_KEY] != FORMAT_VERSION:
            raise DataError(f"{path}: field '{FORMAT_KEY}': version {data[FORMAT_KEY]!r} is not supported "
                            f"(this fastebm reads {FORMAT_VERSION})")
        unknown = sorted(set(data) - {FORMAT_KEY, "movies", "global", "aliases"})
        if unknown:
            raise DataError(f"{path}: unknown field(s) {unknown}; expected movies, global, aliases")
        movies = data.get("movies", {})
        if not isinstance(movies, dict):
            raise DataError(f"{path}: field 'movies': expected an object of data_source -> characters")
        aliases = data.get("aliases", {})
        if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
            raise DataError(f"{path}: field 'aliases': expected an object of spelling -> data_source")
        return cls({m: _check_table(c, path, f"movies.{m}") for m, c in movies.items()}, path,
                   global_profiles=_check_table(data.get("global", {}), path, "global"), aliases=aliases)

    def movie(self, data_source: str) -> str:
        """The movie a record's ``data_source`` names: through ``aliases``, then an exact key, then a key
        equal up to case, spaces and punctuation; else ``data_source`` as it is."""
        name = self.aliases.get(data_source, data_source)
        if name in self.table:
            return name
        return self._folded.get(_fold(name), name)

    def lookup(self, data_source: str, name: str) -> Optional[Profile]:
        """The profile of ``name`` in ``data_source`` (the movie, then the global profiles), or None. Counts nothing."""
        found = self.table.get(self.movie(data_source), {}).get(name)
        return found if found is not None else self.global_profiles.get(name)

    def find(self, data_source: str, name: str) -> Optional[Profile]:
        """``lookup``, counting a miss in ``missing`` (key ``data_source/name``)."""
        found = self.lookup(data_source, name)
        if found is None:
            key = f"{data_source}/{name}"
            self.missing[key] = self.missing.get(key, 0) + 1
        return found

    def get(self, data_source: str, name: str) -> Profile:
        """``find``, with ``NEUTRAL`` for a character without a profile."""
        found = self.find(data_source, name)
        return self.NEUTRAL if found is None else found

    def to_json(self) -> dict:
        """The structured form of these profiles (what ``load`` reads back): a copy, free to change."""
        return copy.deepcopy({FORMAT_KEY: FORMAT_VERSION, "movies": self.table, "global": self.global_profiles,
                              "aliases": self.aliases})


def field_label(name: str) -> str:
    """``speech_style`` -> ``Speech Style``."""
    return name.replace("_", " ").strip().title()


def ordered_fields(profile: dict) -> list[str]:
    """The field names of a structured profile in rendering order: FIELD_ORDER, then the rest as given."""
    return [k for k in FIELD_ORDER if k in profile] + [k for k in profile if k not in FIELD_ORDER]


def render_profile(profile: Optional[Profile], field_format: str = "- {label}: {value}", list_separator: str = ", ",
                   missing: str = Profiles.NEUTRAL) -> str:
    """A profile as prompt text: free text stripped; fields one line each (see the module docstring);
    ``missing`` for None. ``field_format`` takes ``{label}`` and ``{value}`` (checked by the prompts module)."""
    if profile is None:
        return missing
    if isinstance(profile, str):
        return profile.strip()
    lines = []
    for key in ordered_fields(profile):
        v = profile[key]
        text = list_separator.join(x.strip() for x in v if x.strip()) if isinstance(v, list) else v.strip()
        if text:
            lines.append(field_format.format(label=field_label(key), value=text))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The released run's profile database -> the structured form
# ----------------------------------------------------------------------------------------------

RELEASE_NAMES = ("GLOBAL_USER_PROFILES", "MOVIE_PROFILE_DB", "MOVIE_ALIASES")
GROUPS = ("main", "sub", "atmosphere")


@dataclass
class ImportReport:
    """What ``import_release_profiles`` read, left out, and (with records) could not match."""
    source: str
    movies: dict[str, dict[str, int]] = field(default_factory=dict)   # movie -> group -> characters imported
    global_count: int = 0
    aliases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)                     # left out, with the reason
    unmatched: list[tuple[str, str, int, str]] = field(default_factory=list)  # data_source, name, records, hint

    def lines(self) -> list[str]:
        out = [f"{self.source}: {sum(sum(g.values()) for g in self.movies.values())} movie characters in "
               f"{len(self.movies)} movies, {self.global_count} global profiles, {len(self.aliases)} aliases"]
        for movie, groups in self.movies.items():
            out.append(f"  {movie}: " + ", ".join(f"{g} {n}" for g, n in groups.items()))
        out += [f"  left out: {n}" for n in self.notes]
        for ds, name, count, hint in self.unmatched:
            out.append(f"  no profile: {ds} / {name} ({count} record{'s' if count != 1 else ''})"
                       + (f"; did you mean {hint!r}?" if hint else ""))
        return out


def _literals(path: str) -> dict:
    """The top-level literal assignments of RELEASE_NAMES in a Python file, read with ``ast`` (never run)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: profile database not found")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid Python: {e.msg}") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        if name not in RELEASE_NAMES:
            continue
        try:
            found[name] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{path}: line {node.lineno}: {name} is not a plain literal (dicts, lists, tuples, "
                            f"strings, numbers); the importer reads literals only and never runs the file") from None
    if "MOVIE_PROFILE_DB" not in found:
        raise DataError(f"{path}: no MOVIE_PROFILE_DB = {{...}} assignment at the top level "
                        f"(expected the release's structure: movie -> main/sub/atmosphere -> name -> fields)")
    return found


def _fields(value, where: str) -> dict:
    """One character's fields as the structured form holds them: strings and lists of strings
    (tuples become lists, numbers text, None values are dropped)."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a dict of fields, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            items = []
            for i, x in enumerate(v):
                if not isinstance(x, (str, int, float)) or isinstance(x, bool):
                    raise DataError(f"{where}.{k}[{i}]: expected text, got {x!r}")
                items.append(str(x))
            out[str(k)] = items
        elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
            out[str(k)] = str(v)
        else:
            raise DataError(f"{where}.{k}: expected text or a list of text, got {v!r}")
    return out


def import_release_profiles(path: str, include_atmosphere: bool = False) -> tuple[Profiles, ImportReport]:
    """Convert a release-structured Python profile database (see the module docstring) to ``Profiles``."""
    lit = _literals(path)
    report = ImportReport(path)
    glob = lit.get("GLOBAL_USER_PROFILES", {})
    if not isinstance(glob, dict):
        raise DataError(f"{path}: GLOBAL_USER_PROFILES: expected a dict of name -> fields")
    global_profiles = {str(n): _fields(v, f"{path}: GLOBAL_USER_PROFILES[{n!r}]") for n, v in glob.items()}
    report.global_count = len(global_profiles)
    aliases = lit.get("MOVIE_ALIASES", {})
    if not (isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())):
        raise DataError(f"{path}: MOVIE_ALIASES: expected a dict of spelling -> movie name")
    report.aliases = dict(aliases)
    db = lit["MOVIE_PROFILE_DB"]
    if not isinstance(db, dict):
        raise DataError(f"{path}: MOVIE_PROFILE_DB: expected a dict of movie -> groups")
    movies: dict[str, dict] = {}
    for movie, groups in db.items():
        where = f"{path}: MOVIE_PROFILE_DB[{movie!r}]"
        if not isinstance(groups, dict):
            raise DataError(f"{where}: expected a dict with 'main' / 'sub' / 'atmosphere'")
        chars: dict[str, dict] = {}
        counts = {}
        for group, members in groups.items():
            if group not in GROUPS:
                report.notes.append(f"{movie}: group {group!r} (only {', '.join(GROUPS)} are read)")
                continue
            if not isinstance(members, dict):
                raise DataError(f"{where}[{group!r}]: expected a dict of name -> fields")
            if group == "atmosphere" and not include_atmosphere:
                if members:
                    report.notes.append(f"{movie}: {len(members)} 'atmosphere' entries (the released lookup never "
                                        f"reads them; --include-atmosphere imports them)")
                continue
            n = 0
            for name, value in members.items():
                fields = _fields(value, f"{where}[{group!r}][{name!r}]")
                if name in chars:
                    report.notes.append(f"{movie}: {group} {name!r} (already a {group_of(groups, name)} character)")
                elif group != "main" and name in global_profiles:
                    report.notes.append(f"{movie}: {group} {name!r} (a global profile of that name comes first "
                                        f"in the released lookup)")
                else:
                    chars[str(name)] = fields
                    n += 1
            counts[group] = n
        movies[str(movie)] = chars
        report.movies[str(movie)] = counts
    return Profiles(movies, path, global_profiles=global_profiles, aliases=report.aliases), report


def group_of(groups: dict, name: str) -> str:
    return next((g for g in GROUPS if name in groups.get(g, {})), "?")


def unmatched_characters(profiles: Profiles, records: Iterable) -> list[tuple[str, str, int, str]]:
    """(data_source, name, number of records, closest profile name or "") for every record speaker
    (``user`` and ``assistant``) without a profile; counts nothing in ``profiles.missing``."""
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        for name in (r.user, r.assistant):
            if profiles.lookup(r.data_source, name) is None:
                counts[(r.data_source, name)] = counts.get((r.data_source, name), 0) + 1
    out = []
    for (ds, name), n in sorted(counts.items()):
        known = list(profiles.table.get(profiles.movie(ds), {})) + list(profiles.global_profiles)
        folded = {_fold(k): k for k in known}
        hint = folded.get(_fold(name)) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.75)), "")
        out.append((ds, name, n, hint))
    return out
