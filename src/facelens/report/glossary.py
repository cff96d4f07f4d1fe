"""The report's terms of art in plain words, so that an auditor needs no paper to read a table.

Only the terms a page actually uses are listed at its end (`glossary_for`), in alphabetical order.
Each entry says what the number means and which way is better, never how it is computed in code.
"""

from __future__ import annotations

import re

__all__ = ["GLOSSARY", "glossary_for"]

GLOSSARY: dict[str, str] = {
    "Average Drop": "how much a model's score falls, in %, when only the map's most salient part of the face is "
                    "kept (10 % of the saliency mass); lower means the map kept what the model needs.",
    "chip": "the aligned crop of the face that the network actually sees (for dlib-resnet 150×150 pixels, eyes "
            "level, face centred).",
    "cohort z-score": "a match score in units of strangers: 0 is how well two different people's faces match on "
                      "average, 1 is one standard deviation of those stranger scores. The same person scores "
                      "about 4.6 on dlib-resnet.",
    "control map": "a map that knows nothing of the model (random blobs, the image's edges, a blob at the centre). "
                   "A method that does no better than a control explains nothing measurable.",
    "deletion AUC": "the area under the model's score while the face is removed in the map's order, most salient "
                    "first; lower means the map found what the score depends on.",
    "facet": "which kind of input a unit responds to most (activation maximization can find several per unit).",
    "FMR": "false match rate: the share of pairs of different people the model calls the same person.",
    "FNMR": "false non-match rate: the share of pairs of the same person the model calls different people.",
    "given images": "the photos given on the command line (no manifest): a self-test, not a sample of people.",
    "Grad-CAM": "a map from one layer's features weighted by their gradient; coarse (one cell per position of "
                "that layer), fast.",
    "Holm": "a correction of p-values for making several comparisons at once, so that one lucky comparison does "
            "not read as a finding.",
    "Bonferroni": "a wider interval used when several comparisons are made at once, for the same reason as Holm.",
    "impostor": "a pair of photos of two different people; its score is what the model gives strangers.",
    "inconclusive": "the interval contains the threshold, or rests on fewer than 8 photos or people: the data "
                    "cannot tell. An honest answer, not a failure.",
    "insertion AUC": "the area under the model's score while the face is put back in the map's order; higher is "
                     "better.",
    "interval": "the 95 % confidence interval: the range of values compatible with the photos measured. A "
                "claim is supported only when the whole interval lies on its side of the threshold.",
    "integrated gradients": "a map that sums the gradient along a path from a blurred face to the real one.",
    "occlusion": "a map made by covering each patch of the face in turn and measuring how much the score drops; "
                 "slow, but it asks the model directly.",
    "rank correlation": "how similarly two maps order the pixels (Spearman): 1 the same order, 0 unrelated, −1 "
                        "reversed.",
    "rank-1": "the share of probes whose nearest enrolled face is the right person.",
    "region attention": "the share of a map's mass in each face region (eyes, nose, mouth...), divided by the "
                        "region's share of the face: above 1 means the map favours that region.",
    "sanity check": "the map is computed again with the network's weights destroyed layer by layer. A map that "
                    "stays the same shows the image, not what the network learned (Adebayo et al. 2018).",
    "supported": "the whole interval lies on the claimed side of the threshold, on at least 8 photos or people.",
    "the workshop's claim": "the VGG16 workshop's statement that deeper filters have higher entropy and lower "
                            "correlation between neighbours; facelens tests it on faces.",
    "Wilson": "an interval for a proportion that stays honest at 0 and at 100 % (it never has zero width).",
}


def glossary_for(text: str) -> dict[str, str]:
    """The glossary entries whose term appears in ``text`` (HTML or plain; case-insensitive), alphabetically.

    Embedded images and tags are dropped first: a data URI's base64 would otherwise "mention" FMR.
    """
    lower = re.sub(r"<[^>]*>", " ", re.sub(r"data:[^\"' ]+", "", text)).lower()
    found = {term: meaning for term, meaning in GLOSSARY.items()
             if re.search(r"(?<![a-z])" + re.escape(term.lower()) + r"(?![a-z])", lower)}
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))
