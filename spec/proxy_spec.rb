# frozen_string_literal: true

require "spec_helper"

# HTTP/1.1 proxy semantics through `thrust`, against a real Puma.
RSpec.describe "proxy semantics" do
  # Sends raw bytes and returns what comes back until the server closes the
  # connection (or `timeout` passes).
  def raw_exchange(port, data, timeout: 5)
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write(data)
    read_until_close(socket, timeout)
  ensure
    socket&.close
  end

  def read_until_close(socket, timeout)
    out = +""
    deadline = monotonic + timeout
    while monotonic < deadline
      break unless socket.wait_readable(deadline - monotonic)

      out << socket.readpartial(65_536)
    end
    out
  rescue EOFError, Errno::ECONNRESET
    out
  end

  def request_log(thrust, path)
    wait_until(message: "log line for #{path}") do
      thrust.log_lines.find { |l| l["msg"] == "Request" && l["path"] == path }
    end
  end

  describe "streaming" do
    it "delivers SSE events as they are produced, not when the stream ends" do
      _thrust, port = start_thrust_with_puma
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET /sse?n=3&gap=0.7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      started = monotonic
      received = +""
      first_event_at = nil
      each_chunk(socket) do |chunk|
        received << chunk
        first_event_at ||= monotonic - started if received.include?("data: event 0")
      end
      ended_at = monotonic - started
      expect(received).to include("text/event-stream", "data: event 0", "data: event 2")
      # Three events 0.7 s apart: the first must arrive well before the end.
      expect(first_event_at).to be < (ended_at - 1.0)
    ensure
      socket&.close
    end

    it "streams a large request body to the app" do
      _thrust, port = start_thrust_with_puma
      payload = "y" * 3_000_000
      response = Net::HTTP.start("127.0.0.1", port, read_timeout: 20) { |http| http.post("/upload", payload) }
      expect(JSON.parse(response.body)["body"].bytesize).to eq(payload.bytesize)
    end
  end

  describe "WebSocket" do
    def ws_frame(text)
      mask = [1, 2, 3, 4]
      masked = text.bytes.each_with_index.map { |b, i| b ^ mask[i % 4] }
      [0x81, 0x80 | text.bytesize, *mask, *masked].pack("C*")
    end

    def read_ws_frame(socket)
      head = socket.read(2)
      socket.read(head.getbyte(1) & 0x7f)
    end

    it "tunnels an upgraded connection both ways, unaffected by the request timeouts" do
      env = { "HTTP_IDLE_TIMEOUT" => "1", "HTTP_READ_TIMEOUT" => "1", "HTTP_WRITE_TIMEOUT" => "1" }
      thrust, port = start_thrust_with_puma(env:)
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" \
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
      head = +""
      head << socket.readpartial(1) until head.end_with?("\r\n\r\n")
      expect(head).to start_with("HTTP/1.1 101")
      expect(head).to include("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
      socket.write(ws_frame("hello"))
      expect(read_ws_frame(socket)).to eq("hello")
      # Idle for longer than every timeout: the tunnel stays up.
      sleep 2.5
      socket.write(ws_frame("still here"))
      expect(read_ws_frame(socket)).to eq("still here")
      # The session is logged when it ends, not at the 101: no line yet.
      expect(thrust.log_lines.select { |l| l["path"] == "/ws" }).to be_empty
      socket.close
      line = request_log(thrust, "/ws")
      expect(line).to include("status" => 101, "method" => "GET")
      expect(line["dur"]).to be >= 2500
    ensure
      socket&.close unless socket&.closed?
    end
  end

  describe "103 Early Hints" do
    it "reaches the client as soon as the app sends it, before the final response" do
      _thrust, port = start_thrust_with_puma
      socket = TCPSocket.new("127.0.0.1", port)
      socket.write("GET /early?wait=1.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      started = monotonic
      received = +""
      received << socket.readpartial(4096) until received.include?("\r\n\r\n")
      hints_at = monotonic - started
      expect(received).to start_with("HTTP/1.1 103 Early Hints\r\n")
      expect(received).to include("link: </style.css>; rel=preload; as=style")
      received << read_until_close(socket, 10)
      expect(received).to match(%r{\r\n\r\nHTTP/1.1 200 OK\r\n.*after hints\z}m)
      expect(hints_at).to be < 1.0
    ensure
      socket&.close
    end

    it "is not sent to HTTP/1.0 clients (RFC 9110 §15.2)" do
      _thrust, port = start_thrust_with_puma
      response = raw_exchange(port, "GET /early HTTP/1.0\r\nHost: x\r\n\r\n")
      expect(response).to start_with("HTTP/1.0 200 OK")
      expect(response).not_to include("103")
    end
  end

  describe "forwarded headers" do
    let(:spoofed) do
      { "X-Forwarded-For" => "203.0.113.9", "X-Forwarded-Host" => "cdn.test", "X-Forwarded-Proto" => "https",
        "Forwarded" => "for=6.6.6.6" }
    end

    it "trusts and extends them by default (no TLS)" do
      _thrust, port = start_thrust_with_puma
      seen = JSON.parse(http_get(port, "/h", spoofed.merge("Host" => "app.test")).body)["headers"]
      expect(seen).to include("HTTP_X_FORWARDED_FOR" => "203.0.113.9, 127.0.0.1",
                              "HTTP_X_FORWARDED_HOST" => "cdn.test", "HTTP_X_FORWARDED_PROTO" => "https")
      expect(seen).not_to have_key("HTTP_FORWARDED")
    end

    # What Rack and Rails read for request.ssl?, scheme, port and remote_ip.
    let(:other_claims) do
      { "X-Forwarded-Ssl" => "on", "X-Forwarded-Scheme" => "https", "X-Forwarded-Port" => "443",
        "X-Real-IP" => "6.6.6.6", "Client-IP" => "6.6.6.7" }
    end
    let(:other_claim_keys) do
      %w[HTTP_X_FORWARDED_SSL HTTP_X_FORWARDED_SCHEME HTTP_X_FORWARDED_PORT HTTP_X_REAL_IP HTTP_CLIENT_IP]
    end

    it "replaces client values with FORWARD_HEADERS=false" do
      _thrust, port = start_thrust_with_puma(env: { "FORWARD_HEADERS" => "false" })
      seen = JSON.parse(http_get(port, "/h", spoofed.merge(other_claims, "Host" => "app.test")).body)["headers"]
      expect(seen).to include("HTTP_X_FORWARDED_FOR" => "127.0.0.1", "HTTP_X_FORWARDED_HOST" => "app.test",
                              "HTTP_X_FORWARDED_PROTO" => "http")
      expect(seen).not_to have_key("HTTP_FORWARDED")
      expect(seen.keys & other_claim_keys).to be_empty
    end

    it "passes the other forwarding claims on when forwarded headers are trusted" do
      _thrust, port = start_thrust_with_puma
      seen = JSON.parse(http_get(port, "/h", other_claims).body)["headers"]
      expect(seen.values_at(*other_claim_keys)).to eq(other_claims.values)
    end

    it "sends Host: localhost:<TARGET_PORT> for an HTTP/1.0 request without one" do
      _thrust, port = start_thrust_with_puma
      response = raw_exchange(port, "GET /h10 HTTP/1.0\r\n\r\n")
      expect(response).to start_with("HTTP/1.0 200")
      seen = JSON.parse(response.split("\r\n\r\n", 2).last)
      # The app's PORT is thrust's TARGET_PORT.
      expect(seen["headers"]["HTTP_HOST"]).to eq("localhost:#{seen.fetch('port_env')}")
    end

    it "keeps a client X-Request-Start and strips hop-by-hop headers" do
      _thrust, port = start_thrust_with_puma
      headers = { "X-Request-Start" => "t=1", "Connection" => "keep-alive, X-Secret", "X-Secret" => "s",
                  "Proxy-Authorization" => "Basic eA==" }
      seen = JSON.parse(http_get(port, "/h", headers).body)["headers"]
      expect(seen["HTTP_X_REQUEST_START"]).to eq("t=1")
      expect(seen.keys).not_to include("HTTP_X_SECRET", "HTTP_PROXY_AUTHORIZATION")
    end
  end

  describe "errors" do
    it "answers 502 when the app hangs up without a response" do
      dir = Dir.mktmpdir("thrust-502")
      File.write(File.join(dir, "502.html"), "<p>down</p>")
      thrust, port = start_thrust_with_puma(env: { "BAD_GATEWAY_PAGE" => File.join(dir, "502.html") })
      response = http_get(port, "/hang-up")
      expect(response.code).to eq("502")
      expect(response.body).to eq("<p>down</p>")
      expect(request_log(thrust, "/hang-up")["status"]).to eq(502)
    end

    it "answers 413 to an announced oversized body without the app seeing it" do
      thrust, port = start_thrust_with_puma(env: { "MAX_REQUEST_BODY" => "1000" })
      response = Net::HTTP.start("127.0.0.1", port) { |http| http.post("/big", "z" * 5000) }
      expect(response.code).to eq("413")
      ok = Net::HTTP.start("127.0.0.1", port) { |http| http.post("/small", "z" * 1000) }
      expect(ok.code).to eq("200")
      expect(thrust.output).to include("app saw POST /small")
      expect(thrust.output).not_to include("app saw POST /big")
    end

    it "answers 413 when a chunked body passes the limit mid-stream" do
      _thrust, port = start_thrust_with_puma(env: { "MAX_REQUEST_BODY" => "1000" })
      chunk = "a" * 600
      body = "#{"#{chunk.bytesize.to_s(16)}\r\n#{chunk}\r\n" * 3}0\r\n\r\n"
      response = raw_exchange(port, "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n#{body}")
      expect(response).to start_with("HTTP/1.1 413")
    end

    it "answers 504 and logs 504 when the app's headers take longer than HTTP_WRITE_TIMEOUT" do
      thrust, port = start_thrust_with_puma(env: { "HTTP_WRITE_TIMEOUT" => "1" })
      response = http_get(port, "/slow?s=3")
      expect(response.code).to eq("504")
      expect(request_log(thrust, "/slow")["status"]).to eq(504)
    end

    it "answers 431 to oversized headers, 400 to a missing Host or garbage, and keeps serving" do
      thrust, port = start_thrust_with_puma
      expect(raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: #{'a' * 600_000}\r\n\r\n"))
        .to start_with("HTTP/1.1 431")
      expect(raw_exchange(port, "GET /nohost HTTP/1.1\r\n\r\n")).to start_with("HTTP/1.1 400")
      expect(raw_exchange(port, "BLAH\r\n\r\n")).to start_with("HTTP/1.1 400")
      expect(http_get(port, "/after").code).to eq("200")
      expect(thrust.output).not_to include("app saw GET /nohost")
    end
  end

  describe "timeouts" do
    it "closes an idle keep-alive connection after HTTP_IDLE_TIMEOUT" do
      _thrust, port = start_thrust_with_puma(env: { "HTTP_IDLE_TIMEOUT" => "1" })
      started = monotonic
      response = raw_exchange(port, "GET /up HTTP/1.1\r\nHost: x\r\n\r\n", timeout: 10)
      expect(response).to start_with("HTTP/1.1 200")
      expect(monotonic - started).to be < 5
    end

    it "drops a client that does not finish its request head within HTTP_READ_TIMEOUT" do
      thrust, port = start_thrust_with_puma(env: { "HTTP_READ_TIMEOUT" => "1" })
      started = monotonic
      response = raw_exchange(port, "GET /partial HTTP/1.1\r\nHost: x\r\n", timeout: 10)
      expect(response).to eq("")
      expect(monotonic - started).to be < 5
      expect(thrust.output).not_to include("app saw GET /partial")
    end

    it "does not cut a response that keeps streaming past HTTP_WRITE_TIMEOUT" do
      _thrust, port = start_thrust_with_puma(env: { "HTTP_WRITE_TIMEOUT" => "1" })
      response = raw_exchange(port, "GET /sse?n=4&gap=0.6 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                              timeout: 10)
      expect(response).to include("data: event 3")
    end

    it "reuses upstream connections that Puma has since closed without client errors" do
      _thrust, port = start_thrust_with_puma(env: { "PUMA_PERSISTENT_TIMEOUT" => "1" })
      codes = Array.new(4) do
        code = http_get(port, "/h").code
        sleep 1.3 # longer than Puma's keep-alive: Puma closes the pooled connection
        code
      end
      expect(codes).to all(eq("200"))
    end
  end

  describe "h2c" do
    it "serves cleartext HTTP/2 by prior knowledge with H2C_ENABLED, and only then" do
      thrust, port = start_thrust_with_puma(env: { "H2C_ENABLED" => "true" })
      format = "%{http_version} %{http_code}"
      out = IO.popen(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", format,
                      "http://127.0.0.1:#{port}/h2"], &:read)
      expect(out).to eq("2 200")
      expect(request_log(thrust, "/h2")["proto"]).to eq("HTTP/2.0")

      _plain, plain_port = start_thrust_with_puma
      out = IO.popen(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                      "http://127.0.0.1:#{plain_port}/h2"], &:read)
      expect(out).not_to eq("200")
    end
  end

  describe "request log" do
    it "writes Thruster's fields, and nothing with LOG_REQUESTS=false" do
      thrust, port = start_thrust_with_puma
      Net::HTTP.start("127.0.0.1", port) { |http| http.post("/logged?x=1", "abc", "Content-Type" => "text/plain") }
      line = request_log(thrust, "/logged")
      expect(line.keys).to eq(%w[time level msg path status dur method req_content_length req_content_type
                                 resp_content_length resp_content_type remote_addr user_agent cache query proto
                                 request_id])
      expect(line).to include("status" => 200, "method" => "POST", "req_content_length" => 3,
                              "req_content_type" => "text/plain", "resp_content_type" => "application/json",
                              "cache" => "bypass", "query" => "x=1", "proto" => "HTTP/1.1")
      expect(line["remote_addr"]).to start_with("127.0.0.1:")

      quiet, quiet_port = start_thrust_with_puma(env: { "LOG_REQUESTS" => "false" })
      http_get(quiet_port, "/silent")
      wait_until(message: "app to see /silent") { quiet.output.include?("app saw GET /silent") }
      expect(quiet.log_lines.select { |l| l["msg"] == "Request" }).to be_empty
    end

    it "gives every request an X-Request-Id: the client's cleaned as Rails does, or a new one" do
      thrust, port = start_thrust_with_puma
      uuid = /\A\h{8}-\h{4}-4\h{3}-[89ab]\h{3}-\h{12}\z/
      # A clean client id passes through, reaches the app, comes back, is logged.
      response = http_get(port, "/rid-1", { "X-Request-Id" => "abc-123_x@y" })
      expect(JSON.parse(response.body)["headers"]["HTTP_X_REQUEST_ID"]).to eq("abc-123_x@y")
      expect(response["x-request-id"]).to eq("abc-123_x@y")
      expect(request_log(thrust, "/rid-1")["request_id"]).to eq("abc-123_x@y")
      # Cleaned like ActionDispatch::RequestId: other characters removed.
      response = http_get(port, "/rid-2", { "X-Request-Id" => "a b;c<d>" })
      expect(JSON.parse(response.body)["headers"]["HTTP_X_REQUEST_ID"]).to eq("abcd")
      # None, nothing left, or over 200 characters: a new one, never a cut one.
      ["", ";;;", "a" * 201].each_with_index do |sent, i|
        headers = sent.empty? ? {} : { "X-Request-Id" => sent }
        response = http_get(port, "/rid-new-#{i}", headers)
        seen = JSON.parse(response.body)["headers"]["HTTP_X_REQUEST_ID"]
        expect(seen).to match(uuid), sent
        expect(response["x-request-id"]).to eq(seen)
        expect(request_log(thrust, "/rid-new-#{i}")["request_id"]).to eq(seen)
      end
      expect(http_get(port, "/rid-3", { "X-Request-Id" => "a" * 200 })["x-request-id"]).to eq("a" * 200)
      # The app's own id wins in the response.
      expect(http_get(port, "/cache/rid.css?rid=from-app", { "X-Request-Id" => "mine" })["x-request-id"])
        .to eq("from-app")
    end

    it "answers a cache hit with the hit's own request id, not the stored one" do
      _thrust, port = start_thrust_with_puma
      # The app names its own id on a cacheable response: that id belongs to
      # the first request only.
      path = "/cache/rid-hit.css?cc=public,+max-age%3D60&rid=app-made"
      first = identity_request(port, path, headers: { "X-Request-Id" => "first" })
      hit = identity_request(port, path, headers: { "X-Request-Id" => "second" })
      expect([first["x-cache"], first["x-request-id"]]).to eq(%w[miss app-made])
      expect([hit["x-cache"], hit["x-request-id"]]).to eq(%w[hit second])
    end

    it "leaves out the log lines of LOG_REQUESTS_EXCLUDE paths: exact, or prefixes with a trailing *" do
      thrust, port = start_thrust_with_puma(env: { "LOG_REQUESTS_EXCLUDE" => "/up,/assets/*" })
      %w[/up /upload /assets/app.css /assetsx /up/].each { |path| expect(http_get(port, path).code).to eq("200") }
      http_get(port, "/last")
      request_log(thrust, "/last")
      logged = thrust.log_lines.select { |l| l["msg"] == "Request" }.map { |l| l["path"] }
      expect(logged).to include("/upload", "/assetsx", "/up/")
      expect(logged).not_to include("/up", "/assets/app.css")
    end

    it "adds debug lines with DEBUG=1" do
      thrust, port = start_thrust_with_puma(env: { "DEBUG" => "1" })
      expect(http_get(port, "/h").code).to eq("200")
      debug = thrust.log_lines.select { |l| l["level"] == "DEBUG" }
      expect(debug.map { |l| l["msg"] }).to include("Proxying request")
    end
  end
end
