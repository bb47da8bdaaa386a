"""The config: every field declared once (``defaults``), checked before anything runs
(``validation``), and read by field name into the typed options the rest of the package
takes (``options``)."""
