"""Named chat templates for `chat_template: NAME` in a merge config.

The texts are Jinja files beside this module, written here: each renders every conversation as
mergekit 0.1.5's template of the same name renders it under transformers (the parity harness,
bench/parity/tokenizer_cases.py, renders both and requires equal strings). A value
of `chat_template` is one of: `auto` (the template most of the input models share), one of the
names in `NAMES`, or a Jinja template string; anything else is refused by name.
"""

from __future__ import annotations

from importlib import resources

NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def is_name(value: str) -> bool:
    """Whether `value` is meant as a template name rather than a template text (mergekit's rule: a
    short single line without `{`)."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def template_problem(value: str) -> str | None:
    """Why `value` is not a usable `chat_template`, or None."""
    if value == "auto":
        return None
    if is_name(value):
        if value in NAMES:
            return None
        from finrecipe.yamlio import suggest

        return (f"unknown chat template {value!r}" + suggest(value, list(NAMES)) + "; known names: "
                + ", ".join(NAMES) + ", 'auto' (the template most input models share), or a Jinja "
                "template string")
    if len(value) < 20 or "{" not in value:
        return (f"chat_template {value[:40]!r} is neither a known name nor a Jinja template (a template "
                "has at least 20 characters and a '{'); known names: " + ", ".join(NAMES))
    return None


def template_text(name: str) -> str:
    """The Jinja text of a named template."""
    if name not in NAMES:
        raise KeyError(name)
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")
