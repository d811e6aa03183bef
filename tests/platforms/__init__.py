"""Stand-ins for the platforms chest-ct targets, written from their source code.

Each module names the repository, tag and file its rules come from. The
stand-ins refuse what the real systems refuse (strict fields, admission rules,
multi-user namespaces, RBAC), so a test passing here means the same request
would pass there, as far as the rule ported here goes.
"""
