"""Network layer: the only place that touches py-libp2p.

``host`` builds the host and the ``Node`` facade, ``dialer`` reaches peers and gateways,
``admission`` is the TLS transport restricted to our CA, ``rpc``, ``pubsub`` and ``dht`` are
the typed services, ``bulk`` moves large files (with ``sink`` and ``spares`` on the
receiving end), ``limits`` holds the tallies the caps of ``rpc`` and ``bulk`` share,
``runner`` and ``probe`` run nodes for the roles and the CLI, and ``iface`` is the narrow
view of a node that fakes implement. Names are imported from the module that defines
them: this package imports nothing, so that ``iface`` stays free of libp2p.
"""
