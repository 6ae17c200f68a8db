"""The one exception type for bad user input.

Anything the user can fix (a scenario field, a plugin name, a missing file) raises
`UserError`; the CLI prints its message on one line and exits with code 2.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message names the field or file and the fix."""
