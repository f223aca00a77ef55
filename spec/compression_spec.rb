# frozen_string_literal: true

require "spec_helper"
require "zlib"

# Response compression through `thrust`, against a real Puma; curl decodes
# brotli and zstd.
RSpec.describe "compression" do
  # [headers hash, body] as curl received it (decoded with --compressed).
  def curl(port, path, accept: nil, decode: true, head: false)
    args = ["curl", "-s", "-D", "-", "-o", "-"]
    args << "--compressed" if decode
    args += ["-H", "Accept-Encoding: #{accept}"] if accept
    args << "-I" if head
    out = IO.popen([*args, "http://127.0.0.1:#{port}#{path}"], &:read).b
    head, body = out.split("\r\n\r\n", 2)
    headers = head.lines.drop(1).to_h { |l| l.chomp.split(": ", 2).then { |k, v| [k.downcase, v] } }
    [headers, body]
  end

  let(:page) { "<!doctype html><ul>#{(1..200).map { |i| "<li>item #{i}</li>" }.join}</ul>\n" }

  it "negotiates br, zstd and gzip, merging Vary and weakening the ETag" do
    _thrust, port = start_thrust_with_puma
    # Compressed per response: ties go to the cheapest (zstd, gzip, br); the
    # client's q-values come first.
    { "br" => "br", "zstd" => "zstd", "gzip" => "gzip", "gzip, deflate, br, zstd" => "zstd",
      "gzip, deflate, br" => "gzip", "gzip, zstd" => "zstd", "br;q=0.1, gzip" => "gzip",
      "br, zstd;q=0.9, gzip;q=0.8" => "br" }.each do |accept, coding|
      headers, body = curl(port, "/page", accept:)
      expect(headers["content-encoding"]).to eq(coding), accept
      expect(body).to eq(page)
      expect(headers["vary"]).to eq("Accept, Accept-Encoding")
      expect(headers["etag"]).to eq(%(W/"page-1-#{coding}"))
      expect(headers).not_to have_key("content-length")
    end
  end

  it "sends identity without an acceptable coding, for images, and when disabled" do
    _thrust, port = start_thrust_with_puma
    headers, body = curl(port, "/page", decode: false)
    expect(headers).not_to have_key("content-encoding")
    expect(headers["content-length"]).to eq(page.bytesize.to_s)
    expect(headers["vary"]).to eq("Accept, Accept-Encoding")
    expect(body).to eq(page)
    headers, = curl(port, "/logo.png", accept: "gzip")
    expect(headers).not_to have_key("content-encoding")

    _off, off_port = start_thrust_with_puma(env: { "GZIP_COMPRESSION_ENABLED" => "false" })
    headers, = curl(off_port, "/page", accept: "gzip")
    expect(headers).not_to have_key("content-encoding")
    expect(headers["vary"]).to eq("Accept")
  end

  it "leaves per-user responses identity under GZIP_COMPRESSION_DISABLE_ON_AUTH, Vary on credentials included" do
    _thrust, port = start_thrust_with_puma(env: { "GZIP_COMPRESSION_DISABLE_ON_AUTH" => "true" })
    # No Cookie or Authorization in these requests: the response alone says per-user.
    { "Cookie" => "vary=Cookie", "Accept, Authorization" => "vary=Accept,+Authorization",
      "Set-Cookie" => "cookie=s%3D1", "private" => "cc=private" }.each do |why, query|
      headers, = curl(port, "/cache/guard.css?#{query}", accept: "gzip", decode: false)
      expect(headers).not_to have_key("content-encoding"), why
    end
    headers, = curl(port, "/cache/guard.css?vary=Accept", accept: "gzip", decode: false)
    expect(headers["content-encoding"]).to eq("gzip")
  end

  it "gives HEAD the headers GET gets" do
    _thrust, port = start_thrust_with_puma
    headers, = curl(port, "/page", accept: "gzip", head: true, decode: false)
    expect(headers["content-encoding"]).to eq("gzip")
  end

  it "sends a page the app wrote at once as one compressed chunk" do
    _thrust, port = start_thrust_with_puma
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write("GET /page HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
    raw = +""
    each_chunk(socket) { |chunk| raw << chunk }
    head, rest = raw.b.split("\r\n\r\n", 2)
    expect(head).to include("content-encoding: gzip", "transfer-encoding: chunked")
    sizes = []
    payload = +""
    while (m = rest.match(/\A(\h+)\r\n/))
      size = m[1].to_i(16)
      sizes << size
      payload << rest.byteslice(m[0].bytesize, size)
      rest = rest.byteslice(m[0].bytesize + size + 2..)
    end
    # One flushed block and the end of the stream together, then the last
    # chunk: not a chunk per read from the app and one more to end it.
    expect(sizes.length).to eq(2)
    expect(sizes.last).to eq(0)
    expect(Zlib::Inflate.new(Zlib::MAX_WBITS + 32).inflate(payload)).to eq(page)
  ensure
    socket&.close
  end

  it "keeps SSE streaming while compressing it" do
    _thrust, port = start_thrust_with_puma
    socket = TCPSocket.new("127.0.0.1", port)
    socket.write("GET /sse?n=3&gap=0.7 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
    started = monotonic
    raw = +""
    raw << socket.readpartial(4096) until raw.include?("\r\n\r\n")
    head, rest = raw.split("\r\n\r\n", 2)
    expect(head).to include("content-encoding: gzip")
    inflater = Zlib::Inflate.new(Zlib::MAX_WBITS + 32)
    decoded = +""
    first_event_at = nil
    chunked = rest
    # Chunked framing: the decoder only sees payload bytes.
    decode = lambda do
      while (m = chunked.match(/\A(\h+)\r\n/))
        size = m[1].to_i(16)
        break if chunked.bytesize < m[0].bytesize + size + 2

        decoded << inflater.inflate(chunked.byteslice(m[0].bytesize, size)) if size.positive?
        chunked = chunked.byteslice(m[0].bytesize + size + 2..)
      end
      first_event_at ||= monotonic - started if decoded.include?("data: event 0")
    end
    decode.call
    each_chunk(socket) do |chunk|
      chunked << chunk
      decode.call
    end
    expect(decoded).to include("data: event 0", "data: event 2")
    expect(first_event_at).to be < (monotonic - started - 1.0)
  ensure
    socket&.close
  end
end
