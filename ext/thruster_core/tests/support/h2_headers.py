#!/usr/bin/env python3
"""Prints how the response headers of one HTTP/2 GET came over the wire.

usage: h2_headers.py HOST PORT PATH [REQUESTS]

Sends REQUESTS (default 3) GETs of PATH, one after another, on one TLS
connection (ALPN h2; the certificate is not checked) and prints one line
per response header of each: "<request> <name> never-indexed|indexable".
HPACK's never-indexed literal is visible only on the wire, which is why
this reads it with the hpack decoder rather than through a client library.
"""
import sys

import h2.config
import h2.connection
import h2.events
from hpack import NeverIndexedHeaderTuple

from h2_abuse import connect


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    requests = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    sock = connect(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    for n in range(1, requests + 1):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", path)],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("connection closed")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    for header in event.headers:
                        name = header[0].decode() if isinstance(header[0], bytes) else header[0]
                        kind = "never-indexed" if isinstance(header, NeverIndexedHeaderTuple) else "indexable"
                        print(n, name, kind)
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
            sock.sendall(conn.data_to_send())
    sock.close()


if __name__ == "__main__":
    main()
