"""A Pygments lexer for `.ein` files (alias `ein`), registered as a Pygments entry point.

So rich, Sphinx, MkDocs and anything else that uses Pygments highlights `.ein`
code. Tokens follow grammar/einpar.lark: declaration keywords, dtypes,
library and elementwise functions, reductions, tensor names and their
bracketed index lists with `@axis` layouts, numbers, operators, comments.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, Whitespace

from .ir import DTYPES, LIBRARY_FUNCTIONS, REDUCTIONS, UNARY_FUNCTIONS

DECLARATIONS = ("mesh", "dim", "dtype", "input", "param", "output", "repeat")
# Functions written with an index list (`softmax[T](...)`) and those called plainly.
INDEXED_FUNCTIONS = tuple(REDUCTIONS) + tuple(LIBRARY_FUNCTIONS) + ("route",)
FUNCTIONS = tuple(UNARY_FUNCTIONS) + ("where", "max", "min") + INDEXED_FUNCTIONS


class EinLexer(RegexLexer):
    name = "ein"
    aliases = ["ein", "einpar"]
    filenames = ["*.ein"]

    tokens = {
        "root": [
            (r"[ \t\f\r]+", Whitespace),
            (r"\n", Whitespace),
            (r"#[^\n]*", Comment.Single),
            # `repeat L@pp`: a repeat's trips staged over a mesh axis.
            (r"(repeat)(\s+)([A-Za-z_][A-Za-z0-9_]*)(\s*)(@)(\s*)([A-Za-z_][A-Za-z0-9_]*)",
             bygroups(Keyword.Declaration, Whitespace, Name.Label, Whitespace, Operator, Whitespace,
                      Name.Attribute)),
            (words(DECLARATIONS, suffix=r"\b"), Keyword.Declaration),
            (r"1f1b\b", Name),  # `schedule 1f1b`
            (words(DTYPES, suffix=r"\b"), Keyword.Type),
            (r"(%s)(\s*)(\[)(?=[^\]]*\]\s*\()" % "|".join(INDEXED_FUNCTIONS),
             bygroups(Name.Builtin, Whitespace, Punctuation), "indices"),  # softmax[T](...)
            (words(FUNCTIONS, suffix=r"\b(?=\s*\()"), Name.Builtin),
            (r"([A-Za-z_][A-Za-z0-9_]*)(\s*)(\[)", bygroups(Name.Variable, Whitespace, Punctuation),
             "indices"),
            (r"([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?", Number),
            (r">=|<=|==|!=|[-+*/><=:]", Operator),
            (r"[(){},]", Punctuation),
            (r"[A-Za-z_][A-Za-z0-9_]*", Name),
        ],
        # Inside x[...]: index names, `@axis` or `@(a, b)` layouts, commas.
        "indices": [
            (r"[ \t\f\r\n]+", Whitespace),
            (r"(@)(\s*)(\()", bygroups(Operator, Whitespace, Punctuation), "axes"),
            (r"(@)(\s*)([A-Za-z_][A-Za-z0-9_]*)", bygroups(Operator, Whitespace, Name.Attribute)),
            (r"[A-Za-z_][A-Za-z0-9_]*", Name.Label),
            (r",", Punctuation),
            (r"\]", Punctuation, "#pop"),
        ],
        "axes": [
            (r"[ \t\f\r\n]+", Whitespace),
            (r"[A-Za-z_][A-Za-z0-9_]*", Name.Attribute),
            (r",", Punctuation),
            (r"\)", Punctuation, "#pop"),
        ],
    }



# Styles for the terminal (and slides exported from it): the mesh axes of a layout stand out,
# since where a tensor lives is what einpar is about.
STYLES = {
    Keyword.Declaration: "bold magenta",
    Keyword.Type: "cyan",
    Name.Builtin: "bold blue",
    Name.Variable: "bold",
    Name.Label: "green",
    Name.Attribute: "bold yellow",
    Number: "cyan",
    Comment: "dim italic",
}


def highlight(code: str):
    """`code` as a rich Text, styled token by token with this lexer."""
    from rich.text import Text

    text = Text()
    for token, value in EinLexer().get_tokens(code):
        while token not in STYLES and token.parent is not None:
            token = token.parent
        text.append(value, STYLES.get(token, ""))
    if not code.endswith("\n") and text.plain.endswith("\n"):
        text.right_crop(1)  # Pygments ends every text with a newline
    return text
