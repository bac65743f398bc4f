"""Report writing: everything that turns results into files or console output.

* :mod:`~aha.report.plots` -- PNG figures (routing by layer x head, by position, vs window; training curves);
* :mod:`~aha.report.token_view` -- the self-contained HTML token view;
* :mod:`~aha.report.tables` -- Rich console tables (``aha eval``, the demo's headline);
* :mod:`~aha.report.markdown` -- the demo's ``README.md`` and its headline rows.

The plots need matplotlib and the tables rich (the ``eval`` / ``cli`` extras); nothing is imported
here, so each module pulls in only what it uses.
"""
