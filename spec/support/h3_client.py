"""An HTTP/3 client for the specs, on aioquic (installed by bin/setup in
.venv-h3). Sends every request given on one QUIC connection, all at once
(one stream each), and prints one JSON document:

  {"connected": true, "max_streams_bidi": 250,
   "responses": [{"status": 200, "headers": [[name, value], ...],
                  "body_b64": "...", "error": null}, ...]}

or {"connected": false, "error": "..."} when no QUIC handshake completes.

  h3_client.py --port P [--cafile CA] [--host NAME] REQUEST_JSON...

REQUEST_JSON: {"method": "GET", "path": "/", "headers": {...},
               "body_file": "/path"}  (method, headers, body_file optional)

--flood N opens request streams whose bodies never come: as many as the
server allows, then (after printing {"holding": LIMIT} and waiting --hold
seconds) the rest of N beyond the limit, a protocol violation; it reports
how the server ended the connection:
{"connected": true, "closed": true, "error_code": 4}.
"""

import argparse
import asyncio
import base64
import json
import signal
import ssl
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.pending = {}
        self.terminated = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            if not self.terminated.done():
                self.terminated.set_result(event)
            for stream_id, (result, waiter) in self.pending.items():
                if not waiter.done():
                    result["error"] = f"connection closed: {event.error_code} {event.reason_phrase}"
                    waiter.set_result(result)
        if isinstance(event, StreamReset) and event.stream_id in self.pending:
            result, waiter = self.pending[event.stream_id]
            if not waiter.done():
                result["error"] = f"stream reset: {event.error_code}"
                waiter.set_result(result)
        for h3_event in self.h3.handle_event(event):
            entry = self.pending.get(getattr(h3_event, "stream_id", None))
            if entry is None:
                continue
            result, waiter = entry
            if isinstance(h3_event, HeadersReceived):
                for name, value in h3_event.headers:
                    if name == b":status":
                        result["status"] = int(value)
                    else:
                        result["headers"].append([name.decode(), value.decode()])
            elif isinstance(h3_event, DataReceived):
                result["body"] += h3_event.data
            if h3_event.stream_ended and not waiter.done():
                waiter.set_result(result)

    def request(self, authority, spec, end_stream=True):
        stream_id = self._quic.get_next_available_stream_id()
        method = spec.get("method", "GET")
        body = b""
        if spec.get("body_file"):
            with open(spec["body_file"], "rb") as f:
                body = f.read()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", spec.get("path", "/").encode()),
        ]
        for name, value in spec.get("headers", {}).items():
            headers.append((name.lower().encode(), str(value).encode()))
        if not end_stream:
            headers.append((b"content-length", b"10"))
        self.h3.send_headers(stream_id, headers, end_stream=end_stream and not body)
        if body and end_stream:
            self.h3.send_data(stream_id, body, end_stream=True)
        result = {"status": None, "headers": [], "body": b"", "error": None}
        waiter = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = (result, waiter)
        self.transmit()
        return waiter


async def run(args):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.server_name = args.host
    if args.cafile:
        config.load_verify_locations(args.cafile)
    else:
        config.verify_mode = ssl.CERT_NONE
    config.idle_timeout = args.timeout
    authority = f"{args.host}:{args.port}"
    try:
        async with asyncio.timeout(args.timeout):
            client_cm = connect(args.connect, args.port, configuration=config,
                                create_protocol=Client, wait_connected=True)
            client = await client_cm.__aenter__()
    except (TimeoutError, ConnectionError, OSError) as err:
        return {"connected": False, "error": repr(err)}
    try:
        out = {"connected": True,
               "max_streams_bidi": client._quic._remote_max_streams_bidi}
        if args.flood:
            # Up to the server's limit: requests whose bodies never come, each
            # holding a stream (and the proxy's request buffering) open.
            limit = client._quic._remote_max_streams_bidi
            for _ in range(min(limit, args.flood)):
                client.request(authority, {"method": "POST", "path": "/digest"}, end_stream=False)
            # SIGUSR1 ends the hold early (the spec sends it once it has
            # seen other clients served meanwhile).
            hold_over = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, hold_over.set)
            print(json.dumps({"holding": limit}))
            sys.stdout.flush()
            try:
                async with asyncio.timeout(args.hold):
                    await hold_over.wait()
            except TimeoutError:
                pass
            # Past it: a peer that does this is in breach of RFC 9000 §4.6
            # and gets STREAM_LIMIT_ERROR (0x4).
            client._quic._remote_max_streams_bidi = 1 << 40
            for _ in range(max(0, args.flood - limit)):
                client.request(authority, {"method": "POST", "path": "/digest"}, end_stream=False)
            try:
                async with asyncio.timeout(args.timeout):
                    event = await client.terminated
                out.update(closed=True, error_code=event.error_code)
            except TimeoutError:
                out.update(closed=False)
            return out
        waiters = [client.request(authority, spec) for spec in args.requests]
        try:
            async with asyncio.timeout(args.timeout):
                results = await asyncio.gather(*waiters)
        except TimeoutError:
            results = [w.result() if w.done() else {"status": None, "headers": [], "body": b"",
                                                    "error": "timeout"} for w in waiters]
        for result in results:
            result["body_b64"] = base64.b64encode(result.pop("body")).decode()
        out["responses"] = results
        return out
    finally:
        client.close()
        try:
            async with asyncio.timeout(2):
                await client.wait_closed()
        except TimeoutError:
            pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connect", default="127.0.0.1")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--cafile")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("requests", nargs="*", type=json.loads)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
