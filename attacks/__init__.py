"""Attacks: each module registers one attack family in fedsim.registry.ATTACKS."""

from attacks import dlg  # noqa: F401  (registers 'dlg' and 'idlg')
