"""``cdvm keys``: create and show our long-lived Nostr identity.

``keys new`` writes a fresh key file (mode 0600; ``--force`` to replace one) and prints only
the npub. ``keys show`` prints the npub and hex public key of the identity in use
(``$CDVM_NSEC`` or the key file). ``keys show --nsec`` also prints the secret, and only when
stdout is a terminal, so it cannot slip into a pipe, a log or a CI transcript by accident;
to move a key elsewhere, copy the key file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dvm.errors import CdvmError
from dvm.keys import PrivateKey
from dvm.keystore import ENV_VAR, default_key_file, load_identity, write_key_file


class SecretOutputRefused(CdvmError):
    """A secret would have been written somewhere other than a terminal."""


def _new(args: argparse.Namespace) -> int:
    key = PrivateKey.generate()
    path = write_key_file(args.key_file or default_key_file(), key, force=args.force)
    print(key.public_key.npub())
    print(f"cdvm: wrote a new identity to {path} (mode 0600)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.nsec and not sys.stdout.isatty():
        raise SecretOutputRefused("--nsec prints the secret key only to a terminal; copy the key file to move it")
    key = load_identity(args.key_file)
    source = str(args.key_file or (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else default_key_file()))
    public = key.public_key
    shown = {"npub": public.npub(), "hex": public.hex(), "source": source}
    if args.nsec:
        shown["nsec"] = key.nsec()
    if args.json:
        print(json.dumps(shown))
    else:
        for name, value in shown.items():
            print(f"{name + ':':8}{value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cdvm keys new|show``."""
    keys = subparsers.add_parser("keys", help="create or show this node's Nostr identity")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    new = actions.add_parser("new", help="generate a key and write it to a key file (prints the npub)")
    new.add_argument("--key-file", help="where to write it (default: STATE_DIR/identity.key)")
    new.add_argument("--force", action="store_true", help="replace an existing key file (the old key is lost)")
    new.set_defaults(handler=_new)

    show = actions.add_parser("show", help=f"show the identity in use (${ENV_VAR} or the key file)")
    show.add_argument("--key-file", help="read this key file instead of $CDVM_NSEC / the default")
    show.add_argument("--json", action="store_true", help="one JSON object: npub, hex, source")
    show.add_argument("--nsec", action="store_true", help="also print the secret key (only to a terminal)")
    show.set_defaults(handler=_show)
