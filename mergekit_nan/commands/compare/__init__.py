"""``mergekit-nan compare``: candidates (``candidates``), settings and held-out data
(``settings``), merging and scoring (``score``), statistics (``summary``), output
(``report``), the whole run (``run``) and its command-line options (``options``)."""
