"""``mergekit-nan merge``: any recipe, checked first, written atomically (``run``), its
model card (``card``) and its command line (``command``)."""
