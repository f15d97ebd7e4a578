"""Start-up hook of mergekit-nan: register its merge methods when mergekit loads them.

Installed by ``mergekit_nan.pth`` (and ``mergekit_nan.start``, PEP 829).
:func:`install` adds a meta-path finder that waits for
``mergekit.merge_methods``; once that module has executed, the plugin's
methods are registered. At interpreter start-up this imports nothing but
``sys``; it never raises there, and installing twice is harmless.
"""

import sys

_TARGET = "mergekit.merge_methods"


class _RegisteringLoader:
    """Delegates to the real loader, then registers the plugin's methods."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


class _Finder:
    """Meta-path finder that wraps the loader of ``mergekit.merge_methods``."""

    _mergekit_nan = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "_mergekit_nan", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None

    def invalidate_caches(self):
        pass


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


def install():
    """Add the finder once; register at once if mergekit is already loaded."""
    try:
        if not any(getattr(f, "_mergekit_nan", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
        if _TARGET in sys.modules:
            register()
    except Exception:  # start-up must never fail because of this plugin
        pass
