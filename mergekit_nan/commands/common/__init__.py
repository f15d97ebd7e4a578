"""The command line's shared plumbing: options, one-line errors, preflight, outputs, signals.

Every command uses these; they import no other command subpackage.
"""
