"""The self-contained HTML report: views over results that the library computed (see ``html.py``)."""
