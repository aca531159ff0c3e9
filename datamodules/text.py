"""Caption normalisation: the one definition of a caption's words, shared by every part of robucap.

The word-level tokenizer (:mod:`datamodules.tokenizer`), validation BLEU (:mod:`modules.metrics.bleu`), the
backdoor ASR/FTR exact matches (:mod:`modules.metrics.backdoor`), the targeted-attack reports and the test metrics'
fallback without Java all split captions with :func:`caption_tokens`. It reproduces what pycocoevalcap's test
metrics see: Stanford CoreNLP 3.4.1's ``PTBTokenizer -lowerCase -preserveLines`` followed by pycocoevalcap's
removal of punctuation tokens. So the checkpoint is chosen on the BLEU it is tested on, and:

* hyphenated words, decimals and numbers stay whole: ``"t-shirt"``, ``"black-and-white"``, ``"2.5-meter"``,
  ``"1,000"``, ``"3.5"``, ``"10am"``, ``"1/2"``, ``"and/or"``;
* accented letters and other scripts are kept: ``"café"``, ``"piñata"``, ``"zürich"``, ``"一只猫"``;
* clitics split PTB-style: ``"man's"`` -> ``man 's``, ``"don't"`` -> ``do n't``, ``"cannot"`` -> ``can not``;
* quotes and ``. , ; : ? ! - -- ...`` are dropped, but brackets become ``-lrb-``/``-rrb-`` (pycocoevalcap's filter
  lists the upper-case forms, which never match lower-cased output), ``"!!!"``, ``"$"``, ``"%"``, ``"&"``, ``"/"``
  and symbols stay, ``"£"`` becomes ``#`` and ``"€"`` ``$``;
* characters outside Unicode's Basic Multilingual Plane (emoji) are dropped, like the Java lexer does.

The normalisation is three stages of regular expressions that the HF ``tokenizers`` library runs verbatim
(``Replace`` normalizers, a ``Lowercase``, and ``Split`` pre-tokenizers), so a tokenizer exported with a model
splits text exactly like :func:`caption_tokens` without robucap installed. See :data:`CAPTION_NORMALISATION`.
Patterns use only syntax that Python's ``regex`` module and Oniguruma (the engine of ``tokenizers``) read alike:
``\\p{..}`` classes, fixed-width look-behinds, literal replacements.

Where the Java lexer's longest-match rules could not be mirrored, rare forms still differ: letters added to Unicode
after version 6.2, which the Java tables do not know; phone numbers and other digit groups separated by spaces; SGML
tags with attributes and entities other than ``&amp; &quot; &apos; &nbsp; &lt; &gt; &mdash;``; emoticons other than
``:)``-style ones; URLs holding ``&`` or brackets; run-together text such as ``"etc.-x"`` or ``"AT&T-AT&T"``; a curly
apostrophe clitic glued to the next word (``"they’rex"``); a capital dotted ``"İ"`` in a hyphenated word; and the
Java lexer's dependence on the next line (a caption ending in ``"Fig."`` when the next caption starts with a digit).
Java tokenises the last caption of a batch as if no newline followed it, which changes a few clitic corner cases;
robucap always behaves as if one followed. As in Java, a few tokens change when their own output is tokenised again
(``"y'"`` of ``"y'all"``, ``"'t"`` of ``"'tis"``, upper-case compounds such as ``"at&t"``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import regex

__all__ = ["CAPTION_NORMALISATION", "CaptionNormalisation", "Rewrite", "caption_tokens", "normalize_caption"]


@dataclass(frozen=True)
class Rewrite:
    """One normalisation step: every match of ``pattern`` is replaced by the literal text ``replacement``.

    Attributes:
        pattern: A regular expression in the syntax shared by Python's ``regex`` module and Oniguruma.
        replacement: Literal replacement text (no group references: ``tokenizers`` cannot expand them).
    """

    pattern: str
    replacement: str


@dataclass(frozen=True)
class CaptionNormalisation:
    """How a raw caption becomes tokens, as data that both robucap and HF ``tokenizers`` can run.

    The steps are: apply ``cased_rewrites`` in order, lower-case every character on its own (Python's
    ``str.lower`` per character, which is what the ``Lowercase`` normalizer does), apply ``rewrites`` in order,
    take the successive non-overlapping matches of ``token_pattern`` from left to right as the tokens (text between
    them is dropped), then drop every token that matches ``punctuation_pattern`` as a whole.

    Attributes:
        cased_rewrites: Rewrites that must see the original letter case.
        rewrites: Rewrites of the lower-cased text.
        token_pattern: One token; alternatives are tried in order (leftmost-first, as in Python and Oniguruma).
        punctuation_pattern: Tokens that pycocoevalcap's punctuation filter removes (after PTB's own mappings).
    """

    cased_rewrites: tuple[Rewrite, ...]
    rewrites: tuple[Rewrite, ...]
    token_pattern: str
    punctuation_pattern: str


def _char_ranges(wanted: frozenset[str], except_class: str) -> str:
    """Character-class body of the BMP characters whose Unicode category (this Python's database) is in ``wanted``
    and that the class body ``except_class`` does not hold.

    The class is written out as explicit ranges so that both regular-expression engines agree on it whatever their
    own Unicode versions are.
    """
    excepted = regex.compile(f"[{except_class}]")
    parts: list[str] = []
    start: int | None = None
    for code in range(0x10000 + 1):
        inside = code <= 0xFFFF and unicodedata.category(chr(code)) in wanted and excepted.fullmatch(chr(code)) is None
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            end = code - 1
            parts.append(f"\\u{start:04x}" if start == end else f"\\u{start:04x}-\\u{end:04x}")
            start = None
    return "".join(parts)


def _caseless_tail(word: str) -> str:
    """``"About"`` -> ``"A[bB][oO][uU][tT]"``: the first letter as written, the rest in any case (JFlex ``[A]bout``)."""
    return word[0] + "".join(f"[{c}{c.upper()}]" if c.isalpha() else regex.escape(c) for c in word[1:])


# --- Character classes (the Java lexer's macros; see CoreNLP 3.4.1 PTBLexer.flex) --------------------------------

# Line breaks: pycocoevalcap keeps one caption per line, robucap's ptb_tokenize turns them into spaces.
_LINE_BREAKS = "\\r\\n\\u2028\\u2029\\u000b\\u000c\\u0085"
_SPACE = " \\t\\u00a0\\u2000-\\u200a\\u3000"
# Characters PTB's WORD macro accepts besides Java letters (mostly combining marks); soft hyphens are deleted first.
_LETTER_EXTRA = (
    "\\u0237-\\u024f\\u02c2-\\u02c5\\u02d2-\\u02df\\u02e5-\\u02ff\\u0300-\\u036f\\u0370-\\u037d\\u0384\\u0385"
    "\\u03cf\\u03f6\\u03fc-\\u03ff\\u0483-\\u0487\\u04cf\\u04f6-\\u04ff\\u0510-\\u0525\\u055a-\\u055f\\u0591-\\u05bd"
    "\\u05bf\\u05c1\\u05c2\\u05c4\\u05c5\\u05c7\\u0615-\\u061a\\u063b-\\u063f\\u064b-\\u065e\\u0670\\u06d6-\\u06ef"
    "\\u06fa-\\u06ff\\u070f\\u0711\\u0730-\\u074f\\u0750-\\u077f\\u07a6-\\u07b1\\u07ca-\\u07f5\\u07fa\\u0900-\\u0903"
    "\\u093c\\u093e-\\u094e\\u0951-\\u0955\\u0962\\u0963\\u0981-\\u0983\\u09bc-\\u09c4\\u09c7\\u09c8\\u09cb-\\u09cd"
    "\\u09d7\\u09e2\\u09e3\\u0a01-\\u0a03\\u0a3c\\u0a3e-\\u0a4f\\u0a81-\\u0a83\\u0abc-\\u0acf\\u0b82\\u0bbe-\\u0bc2"
    "\\u0bc6-\\u0bc8\\u0bca-\\u0bcd\\u0c01-\\u0c03\\u0c3e-\\u0c56\\u0d3e-\\u0d44\\u0d46-\\u0d48\\u0e30-\\u0e3a"
    "\\u0e47-\\u0e4e\\u0eb1-\\u0ebc\\u0ec8-\\u0ecd"
)
_L = "\\p{L}"  # Java [:letter:]
_D = "\\p{Nd}"  # Java [:digit:]
_LD = "[\\p{L}\\p{Nd}]"
_LX = f"[\\p{{L}}{_LETTER_EXTRA}]"  # PTB LETTER
_LXD = f"[\\p{{L}}\\p{{Nd}}{_LETTER_EXTRA}]"
_APOS = "['\\u2019\\u0092]"
_APOS_ETC = "['\\u2019\\u0092`\\u0091\\u2018\\u201b]"
_HYPHEN = "[-_\\u058a\\u2010\\u2011]"
# Where a new token may start, for rewrites that look back at a token's beginning.
_TOKEN_START = f"[{_SPACE}\"'\\u201c\\u2018(\\[{{]"

# PTB macros over the lower-cased text.
# Possessive quantifiers (*+ ++, read alike by both engines) only where giving characters back could never let
# the rest of the pattern match; they keep matching linear.
_WORD = f"{_LX}{_LXD}*+(?:[.!?]{_LX}{_LXD}*+)*+"
_THING_SEGMENT = f"(?:[dol]{_APOS_ETC}{_LD})?{_LD}++"
_THING = f"{_THING_SEGMENT}(?:{_HYPHEN}{_THING_SEGMENT})*"
_ACRO2 = "[a-z](?:\\.[a-z])+"
_HTHING = f"[a-z0-9][a-z0-9.,]*+(?:-(?:{_ACRO2}\\.|[a-z0-9]++))++"
_THING3 = "[a-z0-9]++(?:-[a-z]++){0,2}(?:/[a-z0-9]++(?:-[a-z]++){0,2}){1,2}"
_FRAC = f"(?:{_D}{{1,4}}[-\\u00a0])?{_D}{{1,4}}(?:\\\\?/|\\u2044){_D}{{1,4}}"
_REDAUX_BODY = "(?:s|m|d|re|ve|ll)"
_REDAUX = f"{_APOS}{_REDAUX_BODY}"
# What would let a longer WORD/THING/THING3 win over a fixed-length rule ("cannot" in "cannots").
_CONTINUES = f"(?:{_LXD}|{_HYPHEN}{_LD}|[.!?]{_LX}|{_REDAUX}|/[a-z0-9])"
_URL_CHAR = '[^ \\t\\n\\f\\r"<>|(){}]'
_URL_END = '[^ \\t\\n\\f\\r"<>|.!?(){},-]'
_URL_PATH = '(?:/[^ \\t\\n\\f\\r"<>|()]+[^ \\t\\n\\f\\r"<>|.!?(){},-])?'
# JFlex reads ",-_" in this class as the range ',' .. '_' (digits, upper case and most ASCII punctuation).
_LIKELY_URL_SEGMENT = "[^ \\t\\n\\f\\r\"`'<>|.!?(){},-_$]++"
_WWW_SEGMENT = '[^ \\t\\n\\f\\r"<>|.!?(){},]++'
_EMAIL_CHAR = '[^ \\t\\n\\f\\r"<>|()\\u00a0{}]'
_EMAIL_CHAR_BUT_AT = '[^ \\t\\n\\f\\r"<>|()\\u00a0{}@]'
_EMAIL_PART = '[^ \\t\\n\\f\\r"<>|(){}.\\u00a0]+'

# Abbreviations that keep their period (ABBREV1, ABBREV2/ABBREV4, ACRO). [M]iss-style entries of the Java lexer are
# case-sensitive: their lower-case forms are split from the period by a cased rewrite before this list applies.
_ABBREVIATIONS = (
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
    "|ala|ariz|az|ark|calif|colo|conn|ct|dak|del|fla|ga|ill|ind|kans?|ky|la|mass|md|mich|minn|miss|mo|mont|neb|nev"
    "|okla|ore|pa|penn|tenn|tex|va|vt|wash|wisc?|wyo"
    "|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq"
    "|jr|sr|bros|(?:ed|ph)\\.d|blvd|rd|esq|etc|al|seq|bldg"
    "|mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave|pres"
    "|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
    "|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept"
    "|[a-z](?:\\.[a-z])*|(?:canada|sino|korean|eu|japan|non)-u\\.s|u\\.s\\.-(?:u\\.k|u\\.s\\.s\\.r)"
)
# "cannot" -> "can" "not" and similar assimilations (only as whole words).
_ASSIMILATIONS = (("can", "not"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("gim", "me"), ("wan", "na"))
_CASE_SENSITIVE_ABBREVIATIONS = ("ark", "az", "del", "ill", "la", "mass", "miss", "ore", "pa", "tex", "wash")
# Words after which a one-letter acronym ("B.") loses its period (the Java rule is case-sensitive).
_SENTENCE_STARTERS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More Mr. Ms. "
    "Now Once One Other Our She Since So Some Such That The Their Then There These They This We When While What Yet "
    "You"
).split()
_QUOTE_CHARS = (
    "`\\u2018\\u2019\\u201a\\u201b\\u201c\\u201d\\u0091\\u0092\\u0093\\u0094\\u201e\\u201f\\u2039\\u203a\\u00ab\\u00bb"
)
_MISC_SYMBOLS = (
    "+%&~^|\\\\\\u00a6\\u00a7\\u00a8\\u00a9\\u00ac\\u00ae\\u00af\\u00b0-\\u00ba\\u00d7\\u00f7\\u0387\\u05be\\u05c0"
    "\\u05c3\\u05c6\\u05f3\\u05f4\\u0600-\\u0603\\u0606-\\u060a\\u060c\\u0614\\u061b\\u061e\\u066a\\u066d"
    "\\u0703-\\u070d\\u07f6-\\u07f8\\u0964\\u0965\\u0e4f\\u1fbd\\u2016\\u2017\\u2020-\\u2023\\u2030-\\u2038\\u203b"
    "\\u203e-\\u2042\\u2044\\u207a-\\u207f\\u208a-\\u208e\\u2100-\\u214f\\u2190-\\u21ff\\u2200-\\u2bff\\u3012\\u30fb"
    "\\uff01-\\uff0f\\uff1a-\\uff20\\uff3b-\\uff40\\uff5b-\\uff65"
)
# Code points that this Python's Unicode database does not assign (except those the Java lexer lists explicitly),
# private-use and surrogate code points, and everything outside the BMP: the Java lexer reads UTF-16 units and
# deletes all of these as untokenizable, so they separate words. Line breaks become spaces too.
_UNTOKENIZABLE = (
    f"[{_char_ranges(frozenset({'Cn', 'Co', 'Cs'}), _LETTER_EXTRA + _MISC_SYMBOLS)}\U00010000-\U0010ffff{_LINE_BREAKS}]"
)
# Private-use markers for the '&' and '+' inside upper-case compounds ("AT&T", "A+B"); the first rewrite turns any
# private-use character of the input into a space, so the markers cannot clash with text.
_AMP_MARK = "\\ue000"
_PLUS_MARK = "\\ue001"
_MARKS = f"[{_AMP_MARK}{_PLUS_MARK}]"


def _after_upper_run(before: str, then: str, max_len: int = 8) -> str:
    """Look-behinds asserting that an upper-case ASCII run of 1..``max_len`` letters and then ``then`` end here,
    the run preceded by ``before`` (a class) or by the start of the text. Fixed-width alternatives, as both engines
    require; callers put them after matching ``then``, so that the search starts from that literal."""
    return "|".join(f"(?<=^[A-Z]{{{n}}}{then})|(?<={before}[A-Z]{{{n}}}{then})" for n in range(1, max_len + 1))


def _cased_rewrites() -> tuple[Rewrite, ...]:
    joiner_start = f"(?:{_TOKEN_START}|{_MARKS})"
    thinga_end = "|".join(f"(?<={_MARKS}[A-Z]{{{n}}})" for n in range(1, 9))
    not_dollar_word = "".join(f"(?<!^[A-Z]{{{n}}})(?<!{_TOKEN_START}[A-Z]{{{n}}})" for n in range(1, 9))
    lower_abbreviation = "|".join(
        f"(?<=^{_caseless_tail(w)}\\.)|(?<=[^\\p{{L}}\\p{{Nd}}]{_caseless_tail(w)}\\.)"
        for w in _CASE_SENSITIVE_ABBREVIATIONS
    )
    starters = "|".join(_caseless_tail(w) for w in _SENTENCE_STARTERS)
    return (
        Rewrite(_UNTOKENIZABLE, " "),
        # Java lower-cases each token as a string, so a word-final capital sigma becomes a final sigma.
        Rewrite("(?<=[\\p{Lu}\\p{Ll}\\p{Lt}])\\u03a3(?![\\p{Lu}\\p{Ll}\\p{Lt}])", "\u03c2"),
        # THINGA: "AT&T", "AT&amp;T", "A+B" are one token only in upper case; mark their joiners, and end the token
        # where the upper-case run ends ("AT&Ts" -> "at&t" "s").
        Rewrite(f"&(?:{_after_upper_run(joiner_start, '&')})(?:[aA][mM][pP];)?(?=[A-Z])", "\ue000"),
        Rewrite(f"\\+(?:{_after_upper_run(joiner_start, '[+]')})(?=[A-Z])", "\ue001"),
        Rewrite(f"(?<=[A-Z])(?![A-Z])(?=[\\p{{L}}\\p{{Nd}}])(?:{thinga_end})", " "),
        # DOLSIGN: "US$" is one token, "us$" is not.
        Rewrite(f"(?<=[\\p{{L}}\\p{{Nd}}]){not_dollar_word}(?=\\$)", " "),
        # [M]iss-style abbreviations keep their period only when capitalised.
        Rewrite(f"\\.(?:{lower_abbreviation})", " ."),
        # "Plan B. The end": a one-letter acronym before a capitalised sentence starter gives up its period.
        Rewrite(
            f"(?:(?<=^[A-Za-z])|(?<=[^\\p{{L}}\\p{{Nd}}.'\\u2019][A-Za-z]))"
            f"(?=\\.[{_SPACE}]+(?:{starters})(?:[{_SPACE}]|$))",
            " ",
        ),
    )


def _rewrites() -> tuple[Rewrite, ...]:
    frac_start = "|".join(f'(?<=^{_D}{{{n}}} )|(?<=[{_SPACE}$#"]{_D}{{{n}}} )' for n in range(1, 5))

    def bracket(char: str, outside: str, in_emoticon: str | None = None) -> tuple[Rewrite, ...]:
        # A bracket becomes a padded PTB token; one that ends a ":)"-style emoticon ("[:;=][-o*']?" before it, no
        # letter or digit after) stays glued to it, as ``in_emoticon`` (or as itself when that is None).
        literal = regex.escape(char)
        emoticon = f"(?:(?<=[:;=]{literal})|(?<=[:;=][-o*']{literal}))(?![a-z0-9])"
        if in_emoticon is None:
            return (Rewrite(f"{literal}(?!{emoticon})", outside),)
        return Rewrite(f"{literal}{emoticon}", in_emoticon), Rewrite(literal, outside)

    curly_redaux = f"[\\u2019\\u0092](?={_REDAUX_BODY})"
    return (
        # Character entities the Java lexer interprets (before '&' is split off).
        Rewrite("&quot;", ' " '),
        Rewrite("&apos;", "'"),
        Rewrite("&nbsp;", " "),
        Rewrite("&(?:md|mdash|ndash);", " -- "),
        Rewrite("&lt;", " < "),
        Rewrite("&gt;", " > "),
        Rewrite("&amp;|&", " & "),
        Rewrite("(?<=\\p{L})\\+(?=\\p{L})", " + "),
        Rewrite(_AMP_MARK, "&"),
        Rewrite(_PLUS_MARK, "+"),
        Rewrite("\\u00ad", ""),  # soft hyphens vanish from words
        # Brackets become their own -lrb-/-rrb- tokens, except inside ":)"-style emoticons.
        *bracket("(", " -lrb- ", "-lrb-"),
        *bracket(")", " -rrb- ", "-rrb-"),
        *bracket("[", " -lsb- "),
        *bracket("]", " -rsb- "),
        *bracket("{", " -lcb- "),
        Rewrite("\\}", " -rcb- "),
        # "2 1/2" is one token, with a no-break space.
        Rewrite(f" (?={_D}{{1,4}}(?:\\\\?/|\\u2044){_D})(?:{frac_start})", "\u00a0"),
        # Currency and vulgar fractions as PTB writes them.
        Rewrite("\\u00a2", " cents "),
        Rewrite("\\u00a3", " # "),
        Rewrite("[\\u0080\\u00a4\\u20a0\\u20ac]", " $ "),
        Rewrite("\\u00bc", " 1/4 "),
        Rewrite("\\u00bd", " 1/2 "),
        Rewrite("\\u00be", " 3/4 "),
        Rewrite("\\u2153", " 1/3 "),
        Rewrite("\\u2154", " 2/3 "),
        # Curly apostrophes of clitics become ASCII ("woman’s" -> "woman 's"), but not inside "o’clock"-style words.
        Rewrite(
            f"(?<={_LD}[dol]){curly_redaux}|(?<![dol]){curly_redaux}|(?<=[dol]){curly_redaux}(?!{_REDAUX_BODY}{_LD})",
            "'",
        ),
        Rewrite("(?<=n)[\\u2019\\u0092](?=t(?!\\p{L}))", "'"),
        Rewrite("(?<=n)[\\u2018\\u201b\\u0091](?=t(?!\\p{L}))", "`"),
    )


# One token; the order of the alternatives stands in for the Java lexer's longest match.
_TOKEN_ALTERNATIVES: tuple[str, ...] = (
    "[<>]?[:;=][-o*']?(?:-lrb-|-rrb-|[dp\\\\{@|\\[\\]])(?![a-z0-9])",  # emoticons
    f"(?!x_x(?:{_LD}|{_HYPHEN}{_LD}))[-^x=~<>']_[-^x=~<>']",
    "</?[a-z][a-z0-9_:.-]*/?>",  # SGML tags without attributes
    "-(?:lrb|rrb|lcb|rcb|lsb|rsb)-",
    f"https?://{_URL_CHAR}+{_URL_END}",
    f"(?:www\\.(?:{_WWW_SEGMENT}\\.)+[a-z]{{2,4}}|(?:{_LIKELY_URL_SEGMENT}\\.)+(?:com|net|org|edu))"
    f"(?!{_LXD}|[.!?]{_LX}|-[a-z0-9]){_URL_PATH}",
    f"[a-z0-9](?={_EMAIL_CHAR_BUT_AT}*+@){_EMAIL_CHAR}*@(?:{_EMAIL_PART}\\.)*{_EMAIL_PART}",
    "[a-z]++(?:[&+][a-z]++)+",  # THINGA, marked by a cased rewrite
    "[a-z]++\\$",  # DOLSIGN ("us$"), kept whole by a cased rewrite
    "c\\+\\+|[cf]#",
    "|".join(f"{head}(?={tail}(?!{_CONTINUES}))" for head, tail in _ASSIMILATIONS),
    "'t(?=is|was)",
    _THING3,
    _FRAC,
    f"{_HTHING}(?!{_LD}|{_HYPHEN}{_LD}|(?<=[dol]){_APOS_ETC}{_LD})",
    f"{_THING_SEGMENT}(?:{_HYPHEN}{_THING_SEGMENT})+",
    f"(?:pro|anti)-|cap{_APOS}n|c{_APOS}est",
    f"cont'd\\.|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|dunkin{_APOS}|somethin{_APOS}|ol{_APOS}|o{_APOS_ETC}o",
    f"(?![dol]{_APOS_ETC}{_REDAUX_BODY}(?!{_LD}))[dol]{_APOS_ETC}{_LD}{_LD}+(?:{_HYPHEN}{_THING_SEGMENT})*",
    f"(?=[a-z]*+{_APOS_ETC})[a-z]*[a-mo-z](?=n{_APOS_ETC}t)",  # SWORD before n't
    f"{_WORD}(?={_REDAUX})",  # WORD before 's 're ...
    f"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\\.(?=[ \\t]?{_D})",
    f"(?=[a-z][a-z-]*+\\.)(?:{_ABBREVIATIONS})\\.(?!{_LX})",
    f"y{_APOS}(?={_L})|[ldj]{_APOS}",
    f"n{_APOS_ETC}{_L}{_L}+|n{_APOS_ETC}t(?![a-z])",
    f"(?={_L}*+{_APOS_ETC}){_L}+[aeiouy]{_APOS_ETC}[aeiou]{_L}*+",
    f"(?:{_WORD}|{_THING})\\.(?=[,;:\\u3001])",
    f"[-+]?{_D}*+(?:[.:,\\u066b\\u066c]{_D}++)++",
    _WORD,
    _THING,
    f"[-+]?{_D}++",
    f"{_APOS}n{_APOS}|(?!'n[a-z][^ \\t\\n\\r\\u00a0]){_APOS}n|{_APOS}em|{_APOS}[2-9]0s|{_APOS}till?|{_APOS}cause",
    f"{_APOS}[0-9][0-9](?=[{_SPACE}]|$)",
    f"'(?:re|ve|ll|[smd])(?![a-z])|'(?![a-z][^ \\t\\n\\r\\u00a0])[smd]|[\\u2019\\u0092]{_REDAUX_BODY}",
    f"@[a-z_][a-z_0-9]*|#{_LX}+",
    "\\$|#+",
    "[\\u207a\\u207b\\u208a\\u208b]?(?:[\\u2070\\u00b9\\u00b2\\u00b3\\u2074-\\u2079]+|[\\u2080-\\u2089]+)",
    "[\\u00bc\\u00bd\\u00be\\u2153-\\u215e]",
    "[\\u00a2\\u00a3\\u00a4\\u00a5\\u0080\\u20a0\\u20ac\\u060b\\u0e3f\\u20a4\\uffe0\\uffe1\\uffe5\\uffe6]",
    "<<|>>|<|>",
    "-+",
    "\\.{3,5}|(?:\\.[ \\u00a0]){2,4}\\.|\\u2026",
    "@+|_+",
    "\\*+",
    "[,;:\\u3001]",
    "[?!]+",
    "[.\\u00a1\\u00bf\\u037e\\u0589\\u061f\\u06d4\\u0700-\\u0702\\u07fa\\u3002]",
    "=",
    "/",
    '"',
    f"''|{_APOS}|[{_QUOTE_CHARS}]{{1,2}}",
    "[\\u0096\\u0097\\u2013\\u2014\\u2015]",
    f"[{_MISC_SYMBOLS}]",
)

# pycocoevalcap's PUNCTUATIONS that can occur in lower-cased output, and the raw forms PTB maps onto them
# (quotes -> `` '' ` ', dashes -> --, ellipses -> ...).
_PUNCTUATION = (
    "''|'|``|`|\\.|\\?|!|,|:|;|-{1,4}|\\.{3,5}|(?:\\.[ \\u00a0]){2,4}\\.|\\u2026|\""
    "|[\\u0096\\u0097\\u2013\\u2014\\u2015]"
    "|[`\\u2018\\u2019\\u201b\\u201c\\u201d\\u0091\\u0092\\u0093\\u0094\\u2039\\u203a\\u00ab\\u00bb]"
    "|[`\\u2018\\u201b\\u2039\\u0091]{2}|[\\u2019\\u203a\\u0092]{2}"
)

CAPTION_NORMALISATION = CaptionNormalisation(
    cased_rewrites=_cased_rewrites(),
    rewrites=_rewrites(),
    # No token starts with a space; saying so first spares trying every alternative at each space.
    token_pattern=f"(?![{_SPACE}])(?:" + "|".join(f"(?:{alternative})" for alternative in _TOKEN_ALTERNATIVES) + ")",
    punctuation_pattern=_PUNCTUATION,
)
"""The normalisation of :func:`caption_tokens`, also built into :func:`datamodules.tokenizer.build_word_tokenizer`."""

_Pattern = re.Pattern[str] | regex.Pattern[str]


def _compile(pattern: str) -> _Pattern:
    """Compile with the standard library when it reads the pattern (it tests large character classes far faster),
    else with ``regex`` (``\\p{..}`` classes; possessive quantifiers before Python 3.11). Both read the patterns
    used here alike."""
    try:
        return re.compile(pattern)
    except re.error:
        return regex.compile(pattern)


@dataclass(frozen=True)
class _CompiledNormalisation:
    """:data:`CAPTION_NORMALISATION` compiled for Python."""

    cased_rewrites: tuple[tuple[_Pattern, str], ...]
    rewrites: tuple[tuple[_Pattern, str], ...]
    token: _Pattern
    punctuation: _Pattern


@lru_cache(maxsize=1)
def _compiled() -> _CompiledNormalisation:
    # Compiled on first use, not on import: it takes a tenth of a second that commands like --help need not pay.
    norm = CAPTION_NORMALISATION
    return _CompiledNormalisation(
        cased_rewrites=tuple((_compile(step.pattern), step.replacement) for step in norm.cased_rewrites),
        rewrites=tuple((_compile(step.pattern), step.replacement) for step in norm.rewrites),
        token=_compile(norm.token_pattern),
        punctuation=_compile(norm.punctuation_pattern),
    )


def _rewrite(text: str, steps: tuple[tuple[_Pattern, str], ...]) -> str:
    for pattern, replacement in steps:
        # A function keeps the replacement literal ("$", "\\" are not template syntax), as in tokenizers.
        text = pattern.sub(lambda _match, literal=replacement: literal, text)
    return text


@lru_cache(maxsize=1 << 16)
def _tokens(text: str) -> tuple[str, ...]:
    compiled = _compiled()
    text = _rewrite(text, compiled.cased_rewrites)
    # Per character, like tokenizers' Lowercase (str.lower on the whole text would also apply final-sigma rules).
    text = "".join(char.lower() for char in text)
    text = _rewrite(text, compiled.rewrites)
    return tuple(t for t in compiled.token.findall(text) if compiled.punctuation.fullmatch(t) is None)


def caption_tokens(text: str) -> list[str]:
    """Split a caption into the tokens pycocoevalcap scores (PTB tokenisation, lower case, punctuation dropped).

    Args:
        text: Raw caption.

    Returns:
        The tokens, e.g. ``"A man's black-and-white T-shirt (2.5 m)."`` ->
        ``["a", "man", "'s", "black-and-white", "t-shirt", "-lrb-", "2.5", "m", "-rrb-"]``.
    """
    return list(_tokens(text))


def normalize_caption(text: str) -> str:
    """Return the caption as normalised tokens joined by single spaces (see :func:`caption_tokens`)."""
    return " ".join(_tokens(text))
