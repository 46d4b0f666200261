"""Whisper's languages: the code in each language token (``<|de|>``) and its English name.

A checkpoint's generation_config.json (``lang_to_id``) says which of them the model has;
this table only turns names into codes and back (``language="German"`` or ``"de"``).
"""

from __future__ import annotations

_TABLE = """
en english; zh chinese; de german; es spanish; ru russian; ko korean; fr french; ja japanese;
pt portuguese; tr turkish; pl polish; ca catalan; nl dutch; ar arabic; sv swedish; it italian;
id indonesian; hi hindi; fi finnish; vi vietnamese; he hebrew; uk ukrainian; el greek; ms malay;
cs czech; ro romanian; da danish; hu hungarian; ta tamil; no norwegian; th thai; ur urdu;
hr croatian; bg bulgarian; lt lithuanian; la latin; mi maori; ml malayalam; cy welsh; sk slovak;
te telugu; fa persian; lv latvian; bn bengali; sr serbian; az azerbaijani; sl slovenian;
kn kannada; et estonian; mk macedonian; br breton; eu basque; is icelandic; hy armenian;
ne nepali; mn mongolian; bs bosnian; kk kazakh; sq albanian; sw swahili; gl galician;
mr marathi; pa punjabi; si sinhala; km khmer; sn shona; yo yoruba; so somali; af afrikaans;
oc occitan; ka georgian; be belarusian; tg tajik; sd sindhi; gu gujarati; am amharic;
yi yiddish; lo lao; uz uzbek; fo faroese; ht haitian creole; ps pashto; tk turkmen;
nn nynorsk; mt maltese; sa sanskrit; lb luxembourgish; my myanmar; bo tibetan; tl tagalog;
mg malagasy; as assamese; tt tatar; haw hawaiian; ln lingala; ha hausa; ba bashkir;
jw javanese; su sundanese; yue cantonese
"""

#: language code -> English name ("de" -> "german")
LANGUAGES: dict[str, str] = dict(
    entry.strip().split(" ", 1) for entry in _TABLE.replace("\n", " ").split(";") if entry.strip()
)
#: English name -> code, with a few other names people use
NAME_TO_CODE: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}


def language_code(language: str) -> str | None:
    """The code for a code, a token (``<|de|>``) or an English name, any case; None if unknown."""
    key = language.strip().lower()
    if key.startswith("<|") and key.endswith("|>"):
        key = key[2:-2]
    if key in LANGUAGES:
        return key
    return NAME_TO_CODE.get(key)
