# frozen_string_literal: true

require "net/http"
require "openssl"
require "socket"

# Helpers shared by the benchmark scripts: ports and process-tree memory.
module BenchSupport
  module_function

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  # Waits until HEAD `path` on the port answers 200 (the server behind it is up).
  def wait_for(port, path: "/hello", timeout: 30, what: "server")
    deadline = Time.now + timeout
    loop do
      begin
        # HEAD: some apps answer every path with a large body.
        return if Net::HTTP.start("127.0.0.1", port, read_timeout: 10) { |http| http.head(path).code == "200" }
      rescue SystemCallError, EOFError, Net::ReadTimeout
        nil
      end
      # Checked after any answer, not only after errors: a proxy answering
      # 502 while its app never comes up must not be waited for forever.
      raise "#{what} did not answer 200 on #{port} within #{timeout} s" if Time.now > deadline

      sleep 0.1
    end
  end

  def children(pid)
    File.read("/proc/#{pid}/task/#{pid}/children").split.map(&:to_i)
  rescue Errno::ENOENT
    []
  end

  def tree(pid) = [pid] + children(pid).flat_map { |c| tree(c) }

  # Sum of one /proc/<pid>/<file> field (KiB) over pids; gone pids count 0.
  def sum_kib(pids, file, field)
    pids.sum do |pid|
      File.read("/proc/#{pid}/#{file}")[/^#{field}:\s+(\d+)/, 1].to_i
    rescue Errno::ENOENT, Errno::ESRCH
      0
    end
  end

  def pss_kib(pids) = sum_kib(pids, "smaps_rollup", "Pss")

  def peak_rss_kib(pids) = sum_kib(pids, "status", "VmHWM")

  # User + system CPU seconds used so far by pids (gone pids count 0).
  def cpu_seconds(pids)
    ticks = pids.sum do |pid|
      File.read("/proc/#{pid}/stat").split(")").last.split.values_at(11, 12).sum(&:to_i)
    rescue Errno::ENOENT, Errno::ESRCH
      0
    end
    ticks / 100.0 # USER_HZ
  end

  def rss_kib(pids) = sum_kib(pids, "status", "VmRSS")

  # Opens `count` connections to 127.0.0.1:port, each sending one GET /hello
  # (mode :h1 cleartext HTTP/1.1, :tls HTTP/1.1 over TLS, :h2 HTTP/2 over
  # TLS), then reads every answer, yields while they are all open and idle,
  # and closes them. As the peer bench (../shared/bench/peers) does: all
  # requests are sent before any answer is read.
  def idle_connections(port, count, mode)
    sockets = Array.new(count) { send_request(port, mode) }
    sockets.each { |s| await_answer(s) }
    yield
  ensure
    sockets&.each { |s| s.close rescue nil } # rubocop:disable Style/RescueModifier
  end

  def send_request(port, mode)
    tcp = TCPSocket.new("127.0.0.1", port)
    return tcp.tap { |s| s.write("GET /hello HTTP/1.1\r\nHost: bench\r\n\r\n") } if mode == :h1

    context = OpenSSL::SSL::SSLContext.new
    context.verify_mode = OpenSSL::SSL::VERIFY_NONE
    context.alpn_protocols = [mode == :h2 ? "h2" : "http/1.1"]
    tls = OpenSSL::SSL::SSLSocket.new(tcp, context)
    tls.sync_close = true
    tls.hostname = "localhost"
    tls.connect
    return tls.tap { |s| s.write("GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n") } if mode == :tls

    raise "no h2 from port #{port} (ALPN #{tls.alpn_protocol.inspect})" unless tls.alpn_protocol == "h2"

    tls.tap { |s| s.write(H2_REQUEST) }
  end

  # An HTTP/2 GET /hello: the preface, empty SETTINGS, then HEADERS on stream 1
  # (END_STREAM | END_HEADERS) with HPACK indexed :method GET, :scheme https,
  # and literal :path and :authority; plus a SETTINGS ack for the server's.
  def h2_frame(type, flags, stream, payload)
    [payload.bytesize >> 8, payload.bytesize & 0xff, type, flags, stream].pack("nCCCN") + payload
  end

  H2_HEADERS = ([0x82, 0x87, 0x04, 6].pack("C*") + "/hello".b + [0x01, 9].pack("CC") + "localhost".b).freeze
  H2_REQUEST = ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".b + h2_frame(4, 0, 0, "".b) + h2_frame(4, 1, 0, "".b) +
                h2_frame(1, 5, 1, H2_HEADERS)).freeze

  # Reads until the answer to /hello arrived.
  def await_answer(socket)
    deadline = Time.now + 30
    received = +""
    until received.include?("Hello, world!")
      raise Errno::ETIMEDOUT, "no answer within 30 s" if Time.now > deadline

      begin
        received << socket.read_nonblock(16_384)
      rescue IO::WaitReadable
        socket.to_io.wait_readable(1)
      end
    end
    socket
  end
end
