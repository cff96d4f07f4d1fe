from __future__ import annotations

from facelens.report.glossary import GLOSSARY, glossary_for


def test_only_the_terms_a_page_uses_in_order():
    page = '<p>Deletion AUC and the <b>cohort z-score</b>; FMR.</p><img src="data:image/png;base64,QUJDZm1yRk1SfnNr">'
    assert list(glossary_for(page)) == ["cohort z-score", "deletion AUC", "FMR"]


def test_terms_inside_words_or_images_do_not_count():
    assert glossary_for("transFMRation chipset") == {}
    assert glossary_for('<img src="data:image/webp;base64,aW5jb25jbHVzaXZlIEZNUg">') == {}


def test_every_entry_is_plain_and_says_something():
    assert all(len(meaning.split()) >= 8 and not meaning.startswith(term) for term, meaning in GLOSSARY.items())
