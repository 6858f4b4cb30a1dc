"""Course support: the lab generator, lab helpers and the check functions the notebooks call.

Nothing in the engine imports this package.
"""
