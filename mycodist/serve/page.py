"""Server-rendered result pages for the plain HTML form, so the page works with JavaScript off.

Every value from the model or the catalogue goes through html.escape.
"""

from __future__ import annotations

from html import escape
from typing import Any

from mycodist.verdict import WARNING

VERDICT_TITLES = {
    "not_identified": "Not identified",
    "poisonous": "Poisonous",
    "do_not_eat": "Do not eat",
    "inedible": "Inedible",
    "edible_species": "Edible species (not a safety check)",
}


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)} · mushroom photo check</title>"
        "<link rel=\"stylesheet\" href=\"/static/style.css\"></head><body><main>"
        "<h1>Mushroom photo check</h1>"
        f"<p class=\"warning\" role=\"note\"><strong>Warning:</strong> {escape(WARNING)}</p>"
        f"{body}<p><a href=\"/\">Check another photo</a></p></main></body></html>\n"
    )


def render_result_page(answer: dict[str, Any]) -> str:
    v = answer["verdict"]
    code = str(v["code"])
    rows = "".join(
        f"<tr><td>{escape(t['common_name'] or t['label'])}</td><td><i>{escape(t['scientific_name'])}</i></td>"
        f"<td>{escape(t.get('family', ''))}</td><td>{escape(t['edibility'])}</td>"
        f"<td class=\"num\">{100 * float(t['probability']):.1f}%</td></tr>"
        for t in answer["top_k"]
    )
    reasons = "".join(f"<li>{escape(str(r))}</li>" for r in v.get("reasons", []))
    body = (
        f"<section id=\"result\" aria-labelledby=\"verdict-title\"><div class=\"verdict verdict-{escape(code)}\">"
        f"<h2 id=\"verdict-title\">{escape(VERDICT_TITLES.get(code, code))}</h2>"
        f"<p id=\"verdict-message\">{escape(v['message'])}</p>"
        f"<ul id=\"verdict-reasons\" class=\"reasons\">{reasons}</ul></div>{_lookalike_table(v.get('lookalikes', []))}"
        "<table><caption>Most likely species</caption><thead><tr><th scope=\"col\">Common name</th>"
        "<th scope=\"col\">Scientific name</th><th scope=\"col\">Family</th><th scope=\"col\">Recorded edibility</th>"
        f"<th scope=\"col\">Probability</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )
    return _page(VERDICT_TITLES.get(code, code), body)


def _lookalike_table(looks: list[dict[str, Any]]) -> str:
    """The top species' known lookalikes: danger, the features that tell them apart, probability, source."""
    if not looks:
        return ""
    rows = "".join(
        f"<tr><td><i>{escape(x.get('scientific_name') or x['label'])}</i></td>"
        f"<td>{escape(x['edibility'])}{' (' + escape(x['syndrome']) + ')' if x.get('syndrome') else ''}</td>"
        f"<td>{escape(x.get('features', ''))}</td><td class=\"num\">"
        + ("not among the model's classes" if x.get("probability") is None else f"{100 * float(x['probability']):.2f}%")
        + f"</td><td>{escape(x.get('citation', ''))}</td></tr>"
        for x in looks)
    return ("<table id=\"lookalikes\"><caption>Known lookalikes of the most likely species</caption><thead><tr>"
            "<th scope=\"col\">Lookalike</th><th scope=\"col\">Edibility</th><th scope=\"col\">How to tell them "
            "apart</th><th scope=\"col\">Probability</th><th scope=\"col\">Source</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def render_error_page(message: str) -> str:
    return _page("Cannot check this photo", f"<p class=\"error\" role=\"alert\">{escape(message)}</p>")
