"""The prompt path: templates and their placeholders (errors name the file and the placeholder),
structured profiles of both speakers in the documented field order, the release-structure profile
importer (read with ast, never run), the history truncation of data.max_prompt_tokens, and
`fastebm data show-prompt` / `fastebm data profiles import` through the real command line."""
from __future__ import annotations

import json
import os
import re
import runpy

import pytest

from fastebm.config import PromptConfig
from fastebm.data import DataError
from fastebm.data.profiles import (FIELD_ORDER, Profiles, import_release_profiles, render_profile,
                                   unmatched_characters)
from fastebm.data.prompts import (PLACEHOLDERS, PromptTooLong, build_chat, encode_prompt, fit_prompt,
                                  load_templates, parse_template, read_template)
from fastebm.data.records import parse_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_DB = os.path.join(ROOT, "tests", "fixtures", "release_profiles.py")


def sample_records(n=36):
    from fastebm.data.sample import make_records

    return [parse_record(r, "sample.json", i) for i, r in enumerate(make_records(n))]


def record_of(assistant, user, records=None):
    return next(r for r in (records or sample_records()) if r.assistant == assistant and r.user == user)


@pytest.fixture(scope="module")
def imported():
    return import_release_profiles(RELEASE_DB)


# ----------------------------------------------------------------------------------------------
# Profiles and the importer
# ----------------------------------------------------------------------------------------------


def test_the_fixture_is_a_trap_if_run():
    with pytest.raises(RuntimeError, match="never run it"):
        runpy.run_path(RELEASE_DB)


def test_import_reads_the_release_structure(imported):
    profiles, report = imported
    movie = profiles.table["Lantern Coast"]
    assert set(movie) == {"Mira", "Tobin", "Captain_Vale"}               # main + sub, shadowed ones out
    assert movie["Mira"]["relationships"] == ["Daughter of the keeper.", "Wary friend of Tobin."]  # a tuple
    assert movie["Mira"]["personality"] == "Quick-witted, stubborn, fiercely loyal to the coast."  # "a" "b"
    assert movie["Mira"]["catchphrases"] == ["Not on my watch.", "The light stays on."]
    assert movie["Tobin"]["age"] == "19"                                   # numbers become text
    assert profiles.global_profiles["harbour_visitor"]["speech_style"] == "Quick questions, warm tone."
    assert "background" not in profiles.global_profiles["harbour_visitor"]  # None values dropped
    assert profiles.aliases == {"The Lantern Coast": "Lantern Coast"}
    assert report.movies == {"Lantern Coast": {"main": 2, "sub": 1}} and report.global_count == 1
    notes = " | ".join(report.notes)
    assert "'harbour_visitor' (a global profile of that name comes first" in notes
    assert "sub 'Mira' (already a main character)" in notes
    assert "1 'atmosphere' entries" in notes
    with_atm, rep2 = import_release_profiles(RELEASE_DB, include_atmosphere=True)
    assert "Harbour crowd" in with_atm.table["Lantern Coast"] and rep2.movies["Lantern Coast"]["atmosphere"] == 1


def test_import_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    src = tmp_path / "db.py"
    src.write_text(f"def build():\n    open({str(marker)!r}, 'w').write('x')\n    return {{}}\n\n"
                   "MOVIE_PROFILE_DB = build()\n")
    with pytest.raises(DataError, match=r"db.py: line 5: MOVIE_PROFILE_DB is not a plain literal"):
        import_release_profiles(str(src))
    assert not marker.exists()
    (tmp_path / "none.py").write_text("PROFILES = {}\n")
    with pytest.raises(DataError, match="no MOVIE_PROFILE_DB"):
        import_release_profiles(str(tmp_path / "none.py"))
    (tmp_path / "bad.py").write_text("MOVIE_PROFILE_DB = {'M': {'main': {'A': {'strengths': [{'x': 1}]}}}}\n")
    with pytest.raises(DataError, match=r"\['M'\]\['main'\]\['A'\].strengths\[0\]: expected text"):
        import_release_profiles(str(tmp_path / "bad.py"))


def test_lookup_through_aliases_and_global_profiles_and_unmatched_speakers(imported):
    profiles = imported[0]
    assert profiles.movie("The Lantern Coast") == "Lantern Coast"          # the alias the records need
    assert profiles.movie("lantern  coast") == "Lantern Coast"             # up to case and spaces
    assert profiles.find("The Lantern Coast", "Mira")["speech_style"] == "Short, direct sentences."
    assert profiles.find("Another Film", "harbour_visitor") is not None    # global: any movie
    assert profiles.find("The Lantern Coast", "Old Wren") is None
    assert profiles.missing == {"The Lantern Coast/Old Wren": 1}
    recs = sample_records()
    unmatched = unmatched_characters(profiles, recs)
    by_name = {name: (n, hint) for _, name, n, hint in unmatched}
    assert set(by_name) == {"Captain Vale", "Old Wren"}
    assert by_name["Captain Vale"][1] == "Captain_Vale" and by_name["Old Wren"][1] == ""
    assert by_name["Old Wren"][0] == sum((r.user == "Old Wren") + (r.assistant == "Old Wren") for r in recs)
    assert profiles.missing == {"The Lantern Coast/Old Wren": 1}           # matching counts nothing


def test_structured_profile_renders_in_the_documented_order(imported):
    mira = imported[0].table["Lantern Coast"]["Mira"]
    assert list(mira)[0] == "motivation"  # the file's order differs from the rendering order
    text = render_profile(mira, "   - {label}: {value}", ", ")
    assert text.splitlines() == [
        "   - Personality: Quick-witted, stubborn, fiercely loyal to the coast.",
        "   - Catchphrases: Not on my watch., The light stays on.",
        "   - Speech Style: Short, direct sentences.",
        "   - Relationships: Daughter of the keeper., Wary friend of Tobin.",
        "   - Strengths: Reads the sea, Climbs anything",
        "   - Weaknesses: Trusts no stranger",
        "   - Motivation: Keep the light burning until her father comes home.",
        "   - Favourite Food: smoked fish",
    ]
    assert [k for k in FIELD_ORDER if k in mira] == ["personality", "catchphrases", "speech_style", "relationships",
                                                    "strengths", "weaknesses", "motivation"]
    assert render_profile("  Free text.  ") == "Free text."
    assert render_profile(None, missing="No profile available.") == "No profile available."


def test_profiles_file_round_trip_and_errors(imported, tmp_path):
    p = tmp_path / "profiles.json"
    p.write_text(json.dumps(imported[0].to_json()))
    back = Profiles.load(str(p))
    assert back.table == imported[0].table and back.global_profiles == imported[0].global_profiles
    assert back.find("The Lantern Coast", "Tobin")["age"] == "19"
    bad = imported[0].to_json()
    bad["movies"]["Lantern Coast"]["Mira"]["strengths"] = [1, 2]
    p.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"field 'movies.Lantern Coast.Mira.strengths': expected a string or a list"):
        Profiles.load(str(p))
    p.write_text(json.dumps({"fastebm_profiles": 1, "movies": {}, "people": {}}))
    with pytest.raises(DataError, match=r"unknown field\(s\) \['people'\]"):
        Profiles.load(str(p))


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


def test_template_errors_name_the_file_and_the_placeholder(tmp_path):
    f = tmp_path / "user.txt"
    f.write_text("Hello {user_name}, this is {character_sheet}.\n")
    with pytest.raises(DataError) as e:
        read_template(str(f), key="prompt.user_file")
    assert str(f) in str(e.value) and "{character_sheet}" in str(e.value) and "prompt.user_file" in str(e.value)
    with pytest.raises(DataError, match=r"missing\.txt: template file not found \(prompt\.system_file\)"):
        load_templates(PromptConfig(system_file=str(tmp_path / "missing.txt")))
    for text, what in (("a {} b", "positional"), ("a {0} b", "positional"), ("a { b", "not a valid template"),
                       ("{dialogue:>10}", "format spec"), ("{movie!r}", "format spec")):
        with pytest.raises(DataError, match=what):
            parse_template(text, "t.txt")
    with pytest.raises(DataError, match=r"prompt.profile_field: unknown placeholder \{key\}"):
        load_templates(PromptConfig(profile_field="{key} = {value}"))
    t = parse_template("{{literal}} {movie}", "t.txt")
    assert t.fields == ("movie",) and t.render({"movie": "M"}) == "{literal} M"


def test_default_templates_use_every_documented_placeholder():
    t = load_templates()
    assert set(t.system.fields) | set(t.user.fields) == set(PLACEHOLDERS)
    assert t.system.source.endswith(os.path.join("templates", "ebm_system.txt"))
    assert not t.system.text.endswith("\n")  # the file's final newline is dropped


def test_chat_has_both_profiles_the_dialogue_tags_and_the_template_text(imported, tmp_path):
    user = tmp_path / "user.txt"
    user.write_text("SCENE NOTES for {assistant_name} in {movie}\nUSER ({user_name}):\n{user_profile}\n"
                    "ASSISTANT ({assistant_name}):\n{assistant_profile}\n{dialogue}\nOpen with <{perception_tag}>.\n")
    templates = load_templates(PromptConfig(user_file=str(user), profile_field="   - {label}: {value}"))
    rec = record_of("Mira", "Tobin")
    system, turn = build_chat(rec, imported[0], templates, ("vision", "think", "answer"))
    assert turn["content"][0] == {"type": "video"}
    text = turn["content"][1]["text"]
    assert text.startswith("SCENE NOTES for Mira in Lantern Coast\nUSER (Tobin):\n   - Personality: Nervous")
    assert "ASSISTANT (Mira):\n   - Personality: Quick-witted" in text and "   - Favourite Food: smoked fish" in text
    assert all(f"{t.speaker}: {t.utterance}" in text for t in rec.dialogue)
    assert text.endswith("Open with <vision>.")
    assert "<vision>" in system["content"] and "</answer>" in system["content"]


@pytest.fixture(scope="module")
def tokenizer():
    from fastebm.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_max_prompt_tokens_drops_the_oldest_turns(tokenizer, imported):
    from fastebm.data.records import Turn

    rec = record_of("Mira", "Tobin")
    rec.dialogue = [Turn("Tobin" if i % 2 == 0 else "Mira", f"line number {i} about the tide") for i in range(15)]
    tags, video = ("vision", "think", "answer"), 37
    full = fit_prompt(tokenizer, rec, imported[0], None, tags, video)
    five = fit_prompt(tokenizer, rec, imported[0], None, tags, video, max_history_turns=5)
    assert full.turns_kept == 15 and full.turns_dropped == 0 and (five.turns_kept, five.turns_dropped) == (5, 10)
    lengths = [len(encode_prompt(tokenizer, build_chat_k(rec, imported[0], k), video)) for k in range(16)]
    assert lengths == sorted(lengths) and lengths[-1] == len(full.ids)
    for limit in (lengths[0], lengths[6] + 1, lengths[11], lengths[15] - 1):
        fitted = fit_prompt(tokenizer, rec, imported[0], None, tags, video, max_prompt_tokens=limit)
        k = max(j for j in range(16) if lengths[j] <= limit)  # the most turns that fit
        assert fitted.turns_kept == k and fitted.turns_dropped == 15 - k and len(fitted.ids) == lengths[k] <= limit
        text = fitted.messages[1]["content"][1]["text"]
        assert all((f"line number {i} " in text) == (i >= 15 - k) for i in range(15))  # the newest k survive
        assert fitted.ids.count(tokenizer.convert_tokens_to_ids("<|video_pad|>")) == video  # the video is whole
    with pytest.raises(PromptTooLong) as e:
        fit_prompt(tokenizer, rec, imported[0], None, tags, video, max_prompt_tokens=lengths[0] - 1)
    msg = str(e.value)
    assert rec.where in msg and f"data.max_prompt_tokens = {lengths[0] - 1}" in msg and f"{video} of them video" in msg


def build_chat_k(rec, profiles, k):
    """The chat with only the last k turns (the truncation's candidates, built independently)."""
    import copy

    r = copy.copy(rec)
    r.dialogue = rec.dialogue[len(rec.dialogue) - k:]
    return build_chat(r, profiles)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Three sample records with real (synthetic) clips; the release fixture imported as their profiles."""
    from fastebm.data.sample import make_records
    from fastebm.data.synth import write_synthetic_clip

    d = tmp_path_factory.mktemp("prompt_data")
    pairs = [("Mira", "Tobin"), ("Tobin", "Captain Vale"), ("Old Wren", "Mira")]
    recs = [next(r for r in make_records(36) if (r["assistant"], r["user"]) == pair) for pair in pairs]
    for r in recs:
        write_synthetic_clip(str(d / r["video_path"]), codec="vp9", width=96, height=72, num_frames=24, fps=8.0, seed=1)
    (d / "train.json").write_text(json.dumps(recs))
    return d, recs


def test_profiles_import_cli(small_dataset, tmp_path, capsys):
    from fastebm.cli import main

    d, _ = small_dataset
    out = tmp_path / "profiles.json"
    assert main(["data", "profiles", "import", RELEASE_DB, str(out), "--records", str(d / "train.json")]) == 0
    text = capsys.readouterr().out
    assert "3 movie characters in 1 movies, 1 global profiles, 1 aliases" in text
    assert "no profile: The Lantern Coast / Captain Vale" in text and "did you mean 'Captain_Vale'?" in text
    assert "no profile: The Lantern Coast / Old Wren" in text
    assert Profiles.load(str(out)).find("The Lantern Coast", "Mira") is not None


def test_show_prompt_prints_the_exact_chat(small_dataset, tmp_path, capsys, monkeypatch):
    from fastebm.cli import main
    from fastebm.data.prompts import VIDEO_PAD

    d, recs = small_dataset
    monkeypatch.chdir(ROOT)
    profiles = tmp_path / "profiles.json"
    main(["data", "profiles", "import", RELEASE_DB, str(profiles)])
    user = tmp_path / "user.txt"
    user.write_text("### CHARACTER PROFILES\nUSER ({user_name}):\n{user_profile}\nASSISTANT ({assistant_name}):\n"
                    "{assistant_profile}\n### DIALOGUE\n{dialogue}\nStart with <{perception_tag}>.\n")
    capsys.readouterr()
    common = ["recipes/tiny.toml", f"data.train={d / 'train.json'}", f"data.video_root={d}", f"data.profiles={profiles}",
              f"prompt.user_file={user}", f"model.tiny_cache_dir={tmp_path / 'models'}"]
    idx = next(i for i, r in enumerate(recs) if r["assistant"] == "Mira")
    assert main(["data", "show-prompt", *common, "--index", str(idx)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("<|im_start|>system\nYou are Mira from Lantern Coast, talking with Tobin.")
    assert "USER (Tobin):\n- Personality: Nervous apprentice cartographer who jokes when afraid.\n- Catchphrases: " \
           "The map is never wrong., Well, almost never.\n- Age: 19\nASSISTANT (Mira):\n- Personality: Quick-witted" in out
    assert "### CHARACTER PROFILES" in out and "### DIALOGUE\n" in out and "Start with <vision>." in out
    assert all(f"{t['speaker']}: {t['utterance']}" in out for t in recs[idx]["dialogue"])
    video = re.search(r"<\|vision_start\|>\[video: (\S+) \| (\d+) frames of (\d+)x(\d+) \| grid \d+x\d+x\d+ \| "
                      r"(\d+) tokens \| [\d.]+ s per temporal patch\]<\|vision_end\|>", out)
    assert video and video.group(1).endswith(recs[idx]["video_path"][2:]) and int(video.group(2)) >= 4
    assert VIDEO_PAD not in out and out.endswith("<|im_start|>assistant\n")
    assert f"templates: system " in err and str(user) in err and "prompt tokens" in err
    # an unknown placeholder: exit 2, naming the placeholder and the file
    user.write_text("{user_name} {mood}\n")
    assert main(["data", "show-prompt", *common]) == 2
    err = capsys.readouterr().err
    assert "{mood}" in err and str(user) in err
