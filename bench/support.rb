# frozen_string_literal: true

require "net/http"
require "open3"
require "openssl"
require "socket"

# Helpers shared by the benchmark scripts: ports, process-tree memory, wrk.
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
  def cpu_seconds(pids) = pids.sum { |pid| stat_seconds("/proc/#{pid}") }

  # The same for the threads of `pid` named `prefix`* (the in-process proxy's in Puma).
  def thread_cpu_seconds(pid, prefix) = Dir.glob("/proc/#{pid}/task/*").sum { |task| stat_seconds(task, prefix) }

  # utime + stime of a /proc process or thread directory (only if its name starts with `prefix`).
  def stat_seconds(dir, prefix = nil)
    return 0 if prefix && !File.read("#{dir}/comm").start_with?(prefix)

    File.read("#{dir}/stat").split(")").last.split.values_at(11, 12).sum(&:to_i) / 100.0 # USER_HZ
  rescue Errno::ENOENT, Errno::ESRCH
    0
  end

  # Milliseconds from one of wrk's latency figures ("812.00us", "1.20ms", "2.01s").
  def ms(text) = text.to_f * { "us" => 0.001, "s" => 1000.0, "m" => 60_000.0 }.fetch(text[/[a-z]+\z/], 1.0)

  # One wrk run against url (2 threads, 1 for 1 connection), optionally pinned to `cpu` (a
  # taskset list): req/s, p50/p99 in ms, requests, non-2xx/3xx answers and socket errors.
  def wrk(url, conns:, duration:, headers: {}, cpu: nil)
    args = ["wrk", "-t#{[2, conns].min}", "-c#{conns}", "-d#{duration}s", "--latency"]
    headers.each { |name, value| args += ["-H", "#{name}: #{value}"] }
    args = ["taskset", "-c", cpu, *args] if cpu
    out, = Open3.capture2e(*args, url)
    non2xx = out.scan(/Non-2xx or 3xx responses: (\d+)/).flatten.sum(&:to_i)
    # connect, read, write and timeout (wrk's 2 s): a slow answer, not a wrong one.
    socket_errors = out[/Socket errors: (.*)/, 1].to_s.scan(/\d+/).sum(&:to_i)
    { rps: out[%r{Requests/sec:\s+([\d.]+)}, 1].to_f, p50: ms(out[/^\s+50%\s+(\S+)/, 1].to_s),
      p99: ms(out[/^\s+99%\s+(\S+)/, 1].to_s), requests: out[/(\d+) requests in/, 1].to_i, non2xx:,
      socket_errors:, errors: non2xx + socket_errors }
  end

  # The upper median (of an even count, the higher middle value), nils dropped.
  def median(values) = values.compact.sort[values.compact.size / 2]

  # Waits for a child to exit: true once it has, false after `timeout` s
  # (it is still reaped when it exits later).
  def wait_exit(pid, timeout) = !Process.detach(pid).join(timeout).nil?

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

# The mixed traffic of bench/memory.rb and bench/code_layout.rb.
module BenchTraffic
  module_function

  # [path, Accept-Encoding] of bench/memory.rb's (and bench/code_layout.rb's)
  # mixed traffic, in turn: the cached CSS in four codings, the page
  # compressed per request, 13-byte responses.
  MIXED = [["/assets/app.css", "gzip"], ["/assets/app.css", "br"], ["/assets/app.css", "zstd"],
           ["/assets/app.css", "identity"], ["/page", "gzip, deflate, br, zstd"], ["/page", "gzip"],
           ["/hello", "gzip"]].freeze

  # `requests` of MIXED, then `downloads` of /download, on 4 keep-alive
  # connections to bench/app.ru behind `port`. Returns what failed (a path,
  # its status and bytes read), empty when every answer was a 200 with a body.
  def mixed_traffic(port, requests:, downloads:, read_timeout: 30)
    jobs = Queue.new
    requests.times { |i| jobs << MIXED[i % MIXED.size] }
    downloads.times { jobs << ["/download", "identity"] }
    failures = Queue.new
    Array.new(4) do
      Thread.new do
        Net::HTTP.start("127.0.0.1", port, read_timeout:) do |http|
          while (job = jobs.pop(true) rescue nil) # rubocop:disable Style/RescueModifier
            path, coding = job
            http.request(Net::HTTP::Get.new(path, "Accept-Encoding" => coding)) do |response|
              bytes = 0
              response.read_body { |chunk| bytes += chunk.bytesize }
              failures << "#{path}: #{response.code}, #{bytes} bytes" unless response.code == "200" && bytes.positive?
            end
          end
        end
      end
    end.each(&:join)
    Array.new(failures.size) { failures.pop }
  end
end
