"""Start-up hook of mergekit-nan: plug into mergekit when mergekit loads, not before.

Installed by ``mergekit_nan.pth`` (and ``mergekit_nan.start``, PEP 829).
:func:`install` adds a meta-path finder that waits for mergekit's modules:

* ``mergekit.merge_methods``: once it has executed, the plugin's merge
  methods are registered (:func:`register`);
* ``mergekit.plan``, ``mergekit.merge``, ``mergekit.scripts.run_yaml`` and
  ``mergekit.scripts.multimerge``: once each has executed, the recipe guard
  is put on it (:func:`guard`), so the stock commands report NAN recipe
  mistakes before anything is written (see ``mergekit_nan.doctor.guard``).

At interpreter start-up this imports nothing but ``sys``; it never raises
there, and installing twice is harmless.
"""

import sys

_TARGETS = (
    "mergekit.merge_methods",
    "mergekit.plan",
    "mergekit.merge",
    "mergekit.scripts.run_yaml",
    "mergekit.scripts.multimerge",
)


class _PluggingLoader:
    """Delegates to the real loader, then plugs the plugin into the loaded module."""

    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _plug(self._fullname)


class _Finder:
    """Meta-path finder that wraps the loaders of the mergekit modules in ``_TARGETS``."""

    _mergekit_nan = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "_mergekit_nan", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PluggingLoader(spec.loader, fullname)
                return spec
        return None

    def invalidate_caches(self):
        pass


def _plug(fullname):
    if fullname == "mergekit.merge_methods":
        register()
    else:
        guard()


def register():
    """Register the plugin's methods now; warn instead of raising on failure.

    While ``mergekit_nan`` itself is being imported its ``__init__`` registers
    once it is complete, so nothing is done here.
    """
    package = sys.modules.get("mergekit_nan")
    if getattr(getattr(package, "__spec__", None), "_initializing", False):
        return
    try:
        from mergekit_nan.registration import register_methods

        register_methods()
    except Exception as error:  # a broken plugin must not break mergekit
        import warnings

        warnings.warn(f"mergekit-nan: could not register merge methods: {error!r}", stacklevel=2)


def guard():
    """Put the recipe guard on mergekit's loaded modules; silently skip if that is not possible.

    The guard only ever reports on recipes that involve NAN; if mergekit's
    internals have moved, mergekit runs exactly as without the plugin.
    """
    try:
        from mergekit_nan.doctor.guard import install_guard

        install_guard()
    except Exception:  # never break mergekit because of the guard
        pass


def install():
    """Add the finder once; plug in at once where mergekit is already loaded."""
    try:
        if not any(getattr(f, "_mergekit_nan", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
        for fullname in _TARGETS:
            if fullname in sys.modules:
                _plug(fullname)
    except Exception:  # start-up must never fail because of this plugin
        pass
