"""cdvm: the Nostr side — keys, events, one module per NIP, relay pool, worker, client and CLI."""
